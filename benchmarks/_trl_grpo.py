"""Baseline: TRL's GRPO trainer (`trl.GRPOTrainer`, TRL 1.12) timed per iteration, as one JSON object.

Run by `benchmarks/grpo_throughput.py` as a subprocess, next to cai's own GRPO, with the same knobs:

    .venv/bin/python benchmarks/_trl_grpo.py --policy MODEL_DIR [--reward-model RM_DIR] --batch-size 16 \
        --num-generations 4 --mini-batches 2 --response-length 32 --ppo-epochs 1 --iterations 4 --seed 0

TRL 1.12.0, not the newest, because `pyproject.toml`'s `bench` extra pins it for the PPO benchmark (TRL 1.16
dropped `trl.experimental.ppo`) and both benchmarks share the environment; its `GRPOTrainer` and `GRPOConfig`
have every setting used here.

The settings map onto `GRPOConfig` as follows, so one iteration does cai's work: `generation_batch_size` =
`--batch-size` answers (K = `num_generations` per prompt), `per_device_train_batch_size` = batch / minibatches,
`gradient_accumulation_steps` 1 (one optimiser step per minibatch, so `steps_per_generation` = minibatches),
`num_iterations` (mu) = `--ppo-epochs`; `max_completion_length` = `--response-length`; beta 0.05 (a nonzero beta
makes TRL compute reference log-probs, with the adapter disabled under LoRA, as cai does); `loss_type` "grpo"
(cai's loss_aggregation "sequence"), `scale_rewards` "group", epsilon 0.2, temperature as given, no vLLM, no
gradient checkpointing unless `--gradient-checkpointing` (TRL's GRPO default is on; cai's is off), a constant
learning rate. LoRA r=8, alpha=16,
all-linear through `peft_config`. The reward is the same seeded one-output reward model as cai's side
(`reward_funcs` a sequence-classification model); the prompts are the same, chat-formatted
(`[{"role": "user", ...}]`), as cai formats them.

Timing: an iteration is `steps_per_generation * num_iterations` trainer steps (the first of them generates and
scores); its seconds run from `on_train_begin` or the previous iteration's last `on_step_end` to its own last
`on_step_end`. The first iteration is dropped as warm-up. Tokens: the prompt mask plus the completion mask (up to
and including the first EOS) of each generation batch, read from `_generate_and_score_completions`' output, the
same count as cai's. Memory as in `_trl_ppo.py`: `peak_rss_mib` is `ru_maxrss` at the last iteration's end,
`rss_after_load_mib` the resident set before training with every weight read once. The JSON object is the only
thing written to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cai_grpo import KL_COEF, parse_args
from _ppo_common import (
    common_result,
    hf_trainer_args,
    iteration_timer,
    load_prompt_texts,
    main,
    make_reward_model,
    resident_after_reading,
)


def log(msg: str) -> None:
    print(f"[trl_grpo] {msg}", file=sys.stderr, flush=True)


def time_phases(trainer, steps_per_iteration: int) -> list[dict[str, float]]:
    """Time the parts of each iteration of TRL's `trainer` by wrapping its methods on the instance: `_generate`
    (sample), `_calculate_rewards` (score), the no-grad `_get_per_token_logps_and_entropies` calls (evaluate: the
    reference's, and the old policy's when there are several minibatches), `training_step` (step) and the
    generation batch built inside an iteration's first step. -> one dict of seconds per iteration, filled as
    training runs (`phase_means` turns them into `PHASES`)."""
    import time

    import torch

    phases: list[dict[str, float]] = []
    steps = itertools.count()

    def timed(name, part):
        """Add the seconds of each call of `trainer.<name>` to this iteration's `part` (a callable: its result, None
        for a call not counted)."""
        method = getattr(trainer, name)

        def wrapper(*a, **kw):
            key = part() if callable(part) else part
            started = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                if key is not None:
                    phases[-1][key] += time.perf_counter() - started
        setattr(trainer, name, wrapper)

    timed("_generate", "sample")
    timed("_calculate_rewards", "score")
    timed("_get_per_token_logps_and_entropies", lambda: None if torch.is_grad_enabled() else "evaluate")
    timed("_generate_and_score_completions", "generation_batch")
    timed("training_step", "step")
    step = trainer.training_step

    def training_step(*a, **kw):
        if next(steps) % steps_per_iteration == 0:
            phases.append(dict.fromkeys(("sample", "score", "evaluate", "generation_batch", "step"), 0.0))
        return step(*a, **kw)

    trainer.training_step = training_step
    return phases


def phase_means(phases: list[dict[str, float]]) -> dict[str, float]:
    """`PHASES` in seconds, mean over `phases` (`time_phases`' iterations): update is the training steps' time less
    the generation batch the first step builds (sampling, scoring, evaluating and TRL's bookkeeping around them).
    transformers' loop clips the gradients and steps the optimiser outside `training_step`: that goes to "other"."""
    update = [it["step"] - it["generation_batch"] for it in phases]
    means = {name: sum(it[name] for it in phases) / len(phases) for name in ("sample", "score", "evaluate")}
    return {name: round(v, 3) for name, v in {**means, "update": sum(update) / len(update)}.items()}


def run(args: argparse.Namespace) -> dict:
    import importlib

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    # TRL 1.12's GRPO module imports its vLLM client whenever vLLM is installed, and that client needs vLLM <= 0.27
    # (cai's judge environment has a newer one, whose weight-transfer API moved). These runs sample with
    # transformers (use_vllm=False), so TRL is told vLLM is absent before the GRPO module loads.
    importlib.import_module("trl.import_utils").is_vllm_available = lambda min_version=None: False
    from trl import GRPOConfig, GRPOTrainer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="trl_grpo_")

    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    texts = load_prompt_texts(args.prompts)
    groups = args.batch_size // args.num_generations
    if len(texts) < groups:
        raise ValueError(f"{len(texts)} prompts is fewer than the {groups} prompts one iteration needs")
    train_dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})

    rm_dir = args.reward_model
    if rm_dir is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rm_dir = make_reward_model(args.policy, os.path.join(tmp.name, "rm"), pad, args.seed)
        tokenizer.save_pretrained(rm_dir)
        log(f"made a reward model from the policy with a seeded score head: {rm_dir}")
    reward_tokenizer = AutoTokenizer.from_pretrained(rm_dir)

    # Weights in fp32 (on CUDA under bf16 autocast through accelerate), or with --bf16 in bf16 under autocast
    # (peft keeps the adapter in float32), as cai's precision bf16 holds its frozen weights.
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=dtype)

    steps_per_iteration = args.mini_batches * args.ppo_epochs
    config = GRPOConfig(
        output_dir=os.path.join(tmp.name, "out"),
        generation_batch_size=args.batch_size,
        per_device_train_batch_size=args.batch_size // args.mini_batches,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        num_iterations=args.ppo_epochs,
        max_completion_length=args.response_length,
        max_steps=args.iterations * steps_per_iteration,
        temperature=args.temperature,
        beta=KL_COEF,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        use_vllm=False,
        lr_scheduler_type="constant",
        gradient_checkpointing=args.gradient_checkpointing,
        **hf_trainer_args(args),
    )

    tokens: list[int] = []
    response_tokens: list[int] = []
    timer, marks, peaks = iteration_timer(steps_per_iteration, log, tokens)

    torch.manual_seed(args.seed)  # LoRA's A matrices (get_peft_model runs inside the trainer)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_model, args=config, train_dataset=train_dataset,
                          processing_class=tokenizer, reward_processing_classes=reward_tokenizer, callbacks=[timer],
                          peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    generate_and_score = trainer._generate_and_score_completions

    def counted(*a, **kw):
        out = generate_and_score(*a, **kw)
        completion = int(out["completion_mask"].sum())
        tokens.append(int(out["prompt_mask"].sum()) + completion)
        response_tokens.append(completion)
        return out

    trainer._generate_and_score_completions = counted
    phases = time_phases(trainer, steps_per_iteration)

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    log(f"trainable parameters (policy LoRA): {trainable:,}; reference: {'a copy' if trainer.ref_model else 'adapter disabled'}")
    rss_after_load = resident_after_reading(trainer.model, trainer.ref_model, trainer.reward_funcs[0])
    trainer.train()

    seconds = [b - a for a, b in itertools.pairwise(marks)]
    if len(seconds) != args.iterations or len(tokens) != args.iterations:
        raise RuntimeError(f"expected {args.iterations} iterations from TRL, saw {len(seconds)} timed and "
                           f"{len(tokens)} generation batches")
    result = {
        **common_result("trl", args, seconds=seconds[1:], tokens=tokens[1:], peak_rss=peaks[-1],
                        rss_after_load=rss_after_load, trainable=trainable, prompts=len(texts)),
        "num_generations": args.num_generations,
        "trl_version": trl.__version__,
        "lora": True,
        "response_tokens_per_iteration": response_tokens[1:],
        "warmup_seconds": round(seconds[0], 4),
        "phases_s": phase_means(phases[1:]),
    }
    tmp.cleanup()
    return result


if __name__ == "__main__":
    sys.exit(main(run, parse_args(description=__doc__), "trl_grpo"))
