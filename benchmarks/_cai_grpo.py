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
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cai_ppo import source_version
from _ppo_common import (
    DEFAULT_PROMPTS,
    add_common_args,
    check_common_args,
    common_result,
    load_prompt_texts,
    main,
    make_reward_model,
    max_rss_mib,
    resident_after_reading,
)

KL_COEF = 0.05
"""beta, on both sides: TRL loads no reference at its default 0, so a nonzero one makes both sides do the same work."""


def add_grpo_args(ap: argparse.ArgumentParser) -> None:
    """The knobs `_cai_grpo.py` and `_trl_grpo.py` take beyond the PPO benchmark's (`add_common_args`)."""
    ap.add_argument("--num-generations", type=int, default=4, help="K: answers per prompt; --batch-size counts answers")


def check_grpo_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    check_common_args(ap, args)
    if args.num_generations < 2:
        ap.error("--num-generations must be at least 2 (an answer is compared with the others of its group)")
    if args.batch_size % args.num_generations:
        ap.error(f"--batch-size ({args.batch_size}) counts answers and must be divisible by --num-generations "
                 f"({args.num_generations})")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="local causal-LM folder (or a name cai.models.resolve_model knows)")
    ap.add_argument("--reward-model", default=None,
                    help="local sequence-classification folder (num_labels=1) with its tokenizer; default: one made "
                         "from --policy with a seeded score head")
    add_common_args(ap)
    add_grpo_args(ap)
    return check_grpo_args(ap, ap.parse_args(argv))


def log(msg: str) -> None:
    print(f"[cai_grpo] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

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
    cuda = torch.cuda.is_available()
    tmp = tempfile.TemporaryDirectory(prefix="cai_grpo_")

    prompts = args.prompts
    if prompts is None:
        prompts = os.path.join(tmp.name, "prompts.jsonl")
        Path(prompts).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
    n_prompts = len(load_prompt_texts(prompts))

    rm_dir = args.reward_model
    if rm_dir is None:
        tokenizer = AutoTokenizer.from_pretrained(args.policy)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rm_dir = make_reward_model(args.policy, os.path.join(tmp.name, "rm"), pad, args.seed)
        tokenizer.save_pretrained(rm_dir)  # cai's scorer reads the reward model's own tokenizer
        log(f"made a reward model from the policy with a seeded score head: {rm_dir}")

    cfg = GRPOJob(
        model=args.policy, reward=rm_dir, prompts=prompts, out=os.path.join(tmp.name, "out"),
        max_prompt_length=args.max_prompt_length, iterations=args.iterations, batch_size=args.batch_size,
        num_generations=args.num_generations, mini_batches=args.mini_batches, ppo_epochs=args.ppo_epochs,
        response_length=args.response_length, temperature=args.temperature, advantage="grpo", scale_rewards="group",
        loss_aggregation="sequence", kl_in="loss", kl_coef=KL_COEF, adaptive_kl=False, missing_eos_penalty=None,
        lr=args.lr, lora_r=8, lora_alpha=16, lora_target_modules="all-linear", gold_judge_every=0,
        checkpoint_every=10**9, log_samples_every=10**9, seed=args.seed,
    )
    trainer = build_rl_trainer(GRPOTrainer, cfg)
    scorer_model = getattr(trainer.scorer, "model", None)

    peaks: list[float] = []
    update = trainer.update  # the end of an iteration: train() calls update(rollout(i))

    def timed_update(rollout):
        out = update(rollout)
        if cuda:
            torch.cuda.synchronize()
        peaks.append(max_rss_mib())
        log(f"iteration {rollout.iteration + 1}: {out[0]['seconds']:.2f}s, {out[0]['tokens']} tokens")
        return out

    trainer.update = timed_update
    trainable = sum(p.numel() for p in trainer.params)
    log(f"trainable parameters (policy LoRA): {trainable:,}; reference: adapter disabled")
    rss_after_load = resident_after_reading(trainer.model, scorer_model)
    try:
        trainer.train()
    finally:
        trainer.close()

    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) != args.iterations:
        raise RuntimeError(f"expected {args.iterations} iterations in metrics.jsonl, saw {len(rows)}")
    timed = rows[1:]
    result = {
        **common_result("cai", args, seconds=[r["seconds"] for r in timed], tokens=[r["tokens"] for r in timed],
                        peak_rss=peaks[-1], rss_after_load=rss_after_load, trainable=trainable, prompts=n_prompts),
        "num_generations": args.num_generations,
        "cai_grpo_source": source,
        "lora": True,
        "response_tokens_per_iteration": [round(r["response/length_mean"] * args.batch_size) for r in timed],
        "warmup_seconds": rows[0]["seconds"],
        "gradient_checkpointing": False,
    }
    tmp.cleanup()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[cai_grpo] %(name)s: %(message)s")
    sys.exit(main(run, parse_args(), "cai_grpo"))
