"""cai's own GRPO (`cai.train.rl.grpo.GRPOTrainer`) timed per iteration, as one JSON object: the twin of `_trl_grpo.py`.

Run by `benchmarks/grpo_throughput.py` as a subprocess, next to TRL's GRPOTrainer, with the same knobs:

    .venv/bin/python benchmarks/_cai_grpo.py --policy MODEL_DIR [--reward-model RM_DIR] --batch-size 16 \
        --num-generations 4 --mini-batches 2 --response-length 32 --ppo-epochs 1 --iterations 4 --seed 0

One iteration is cai's rollout + `update`: `--batch-size` answers (`--batch-size / --num-generations` prompts, K
answers each), scored by the reward model, log-probs (adapter on) and reference log-probs (adapter off), group
advantages (GRPO's mean baseline, scaled by the group's std), then `--ppo-epochs` passes over `--mini-batches`
minibatches (one optimiser step each) with the clipped token loss, beta * k3 in the loss (kl_coef 0.05) and
sequence aggregation (TRL's loss_type "grpo"). No missing-EOS penalty (TRL's GRPO has none). The policy is base +
LoRA (r=8, alpha=16, all-linear).

Timing, tokens and memory are taken as in `_cai_ppo.py`: `seconds` and `tokens` (non-pad prompt tokens plus each
answer up to and including its first EOS) from the run's `metrics.jsonl`, the first iteration dropped as warm-up;
`peak_rss_mib` is `ru_maxrss` when the last iteration's update returns; `rss_after_load_mib` the resident set
before training with every weight read once. `cai_grpo_source` records the git blob ids of the trainer's sources
as run. The JSON object is the only thing written to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cai_ppo import source_version
from _ppo_common import (
    add_common_args,
    cai_inputs,
    cai_job_fields,
    cai_run_result,
    check_common_args,
    main,
    resident_after_reading,
    time_updates,
)

KL_COEF = 0.05
"""beta, on both sides: TRL loads no reference at its default 0, so a nonzero one makes both sides do the same work."""


def parse_args(argv: list[str] | None = None, description: str | None = __doc__) -> argparse.Namespace:
    """The flags of `_cai_grpo.py` and `_trl_grpo.py` (`--forward-batch-size` and `--unmerged-rollouts` are cai's only;
    `--gradient-checkpointing` and `--bf16` act on either)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, policy_help="local causal-LM folder (or, for cai, a name cai.models.resolve_model knows)",
                    reward_help="local sequence-classification folder (num_labels=1) with its tokenizer; default: one "
                                "made from --policy with a seeded score head")
    ap.add_argument("--num-generations", type=int, default=4, help="K: answers per prompt; --batch-size counts answers")
    ap.add_argument("--forward-batch-size", type=int, default=None,
                    help="cai's forward_batch_size: rows per no-grad pass (default the whole batch; TRL's GRPO takes "
                         "per_device_train_batch_size rows at a time)")
    ap.add_argument("--unmerged-rollouts", action="store_true",
                    help="cai's merged_rollouts: false: sample through the unmerged adapter, with no merged copy of the "
                         "adapted weights (less memory, slower decoding; TRL samples that way)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="both sides recompute each decoder layer's activations in the backward (TRL's GRPO default; "
                         "cai's gradient_checkpointing)")
    ap.add_argument("--bf16", action="store_true",
                    help="both sides in bfloat16: autocast on, the frozen weights (the policy's base, the reward model) "
                         "loaded in bf16, adapters and optimiser in float32 (cai's precision bf16; TRL's bf16=True with "
                         "its models loaded in bf16). Default: float32 on a CPU")
    args = check_common_args(ap, ap.parse_args(argv))
    if args.num_generations < 2:
        ap.error("--num-generations must be at least 2 (an answer is compared with the others of its group)")
    if args.batch_size % args.num_generations:
        ap.error(f"--batch-size ({args.batch_size}) counts answers and must be divisible by --num-generations "
                 f"({args.num_generations})")
    return args


def log(msg: str) -> None:
    print(f"[cai_grpo] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    import torch

    import cai.train.rl.group
    import cai.train.rl.grpo
    import cai.train.rl.sampling
    import cai.train.rl.trainer
    from cai.train.rl.build import build_rl_trainer
    from cai.train.rl.grpo import GRPOTrainer
    from cai.train.rl.settings import GRPOJob

    source = source_version([cai.train.rl.trainer.__file__, cai.train.rl.grpo.__file__, cai.train.rl.group.__file__,
                             cai.train.rl.sampling.__file__])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="cai_grpo_")

    prompts, n_prompts, rm_dir = cai_inputs(args, tmp.name, log)

    cfg = GRPOJob(**cai_job_fields(args, os.path.join(tmp.name, "out"), prompts, rm_dir),
                  num_generations=args.num_generations, forward_batch_size=args.forward_batch_size,
                  merged_rollouts=not args.unmerged_rollouts, gradient_checkpointing=args.gradient_checkpointing,
                  precision="bf16" if args.bf16 else "auto", advantage="grpo",
                  scale_rewards="group", loss_aggregation="sequence", kl_in="loss", kl_coef=KL_COEF, missing_eos_penalty=None)
    trainer = build_rl_trainer(GRPOTrainer, cfg)
    scorer_model = getattr(trainer.scorer, "model", None)

    peaks = time_updates(trainer, log)
    trainable = sum(p.numel() for p in trainer.params)
    log(f"trainable parameters (policy LoRA): {trainable:,}; reference: adapter disabled")
    rss_after_load = resident_after_reading(trainer.model, scorer_model)
    try:
        trainer.train()
    finally:
        trainer.close()

    result = {
        **cai_run_result(args, cfg.out, peaks=peaks, rss_after_load=rss_after_load, trainable=trainable, prompts=n_prompts),
        "num_generations": args.num_generations,
        "cai_grpo_source": source,
        "forward_batch_size": args.forward_batch_size,
    }
    tmp.cleanup()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[cai_grpo] %(name)s: %(message)s")
    sys.exit(main(run, parse_args(), "cai_grpo"))
