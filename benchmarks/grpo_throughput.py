"""GRPO throughput and memory: cai's GRPO (`cai.train.rl.grpo`) against TRL's `GRPOTrainer` (TRL 1.12), as JSON.

The twin of `ppo_throughput.py`, whose machinery it uses (subprocess per run, ABBA order, quiet-CPU wait, the
library floor, the same summary). For each model, one reward model (the policy with a seeded one-output score head,
as in the PPO benchmark, on both sides) and one prompt file (the PPO benchmark's 64 prompts) are made, then
`_cai_grpo.py` and `_trl_grpo.py` run one at a time with the same answers per iteration (`--batch-size`), K
(`--num-generations`), minibatches, completion length, passes (cai's ppo_epochs = TRL's num_iterations), beta 0.05,
sequence loss aggregation (TRL's loss_type "grpo"), group-std scaling, temperature 1, threads, seed and LoRA (r=8,
alpha=16, all-linear; the reference is the adapter disabled on both sides).

Per trainer: tokens/s (non-pad prompt tokens + answer tokens up to and including EOS, per iteration, the first
iteration dropped as warm-up), peak RSS and the rest of `ppo_throughput.py`'s fields; per model `speedup`,
`memory_ratio` and `meets_targets` against the targets (speedup >= 1.5, memory_ratio <= 0.7).

Both sides also split an iteration into `phases_s`: sample (prefill and decoding), score (the reward model),
evaluate (no-grad log-prob passes: the reference's; TRL's also the old policy's, which cai reads off its sampling
steps), update (the minibatches' forward and backward) and other (the rest). The phases cai and TRL share
(score, the reference's pass, update) run the same transformers forwards and backwards on both sides, so
`sampling_bound` says how far a faster sampler alone could take the speedup.

`judge_load` answers what the same shape would cost a judge with the group-pairwise reward (`judge:pairwise`,
`cai.train.rewards.GroupPairwiseScorer`): per iteration, groups x pairs /v1/compare requests, each judged in both
orders (2 engine prompts per principle, 1 principle by default); and the prompt tokens of one engine prompt: the
compare template with the default constitution's principles and these prompts, chat-templated with the policy's
tokenizer (a stand-in for the judge's), plus the two answers at the cai runs' mean answer length.
`grpo_judge.py` measures the same against a real judge server, prefix-cache share included.

Weights are float32 on a CPU; `--bf16` runs both sides in bfloat16 (autocast, the frozen policy base and the reward
model loaded in bf16, adapters and optimiser float32), as a GPU run would.

    .venv/bin/python benchmarks/grpo_throughput.py --models tiny
    .venv/bin/python benchmarks/grpo_throughput.py --models smollm2-135m-instruct --repeats 1 --save
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _cai_grpo import KL_COEF
from _ppo_common import DEFAULT_PROMPTS
from ppo_throughput import add_run_args, print_report, run_models, summarise

TARGETS = {"speedup": 1.5, "memory_ratio": 0.7}
SCRIPTS = {"cai": HERE / "_cai_grpo.py", "trl": HERE / "_trl_grpo.py"}


def compare_prompt_tokens(tokenizer, principle, prompt: str, first: str, second: str) -> int:
    """Tokens of the judge's prompt comparing `first` with `second` (one order, no CoT), built as the judge's engine
    builds it (`judge_server.engine.TokenizedEngine.encode`)."""
    from judge_server.templates import COMPARE_PREFIX, compare_messages

    text = tokenizer.apply_chat_template(compare_messages(principle, prompt, first, second, cot=False), tokenize=False,
                                         add_generation_prompt=True) + COMPARE_PREFIX
    return len(tokenizer.encode(text, add_special_tokens=False))


def sampling_bound(summary: dict) -> dict | None:
    """How far cai's speed could go by sampling faster alone: its tokens/s against TRL's with the sample phase taken
    as 0 s, and the seconds sampling would have to fit in for the speedup target (negative: out of reach however
    fast the sampling). None without both sides' `phases_s`."""
    cai, trl = summary["cai"], summary["trl"]
    if "phases_s" not in cai or "phases_s" not in trl:
        return None
    tokens = cai["tokens_per_s"] * cai["seconds_per_iteration"]  # per iteration
    rest = cai["seconds_per_iteration"] - cai["phases_s"]["sample"]
    return {"cai_seconds_besides_sampling": round(rest, 3), "cai_sampling_seconds": cai["phases_s"]["sample"],
            "speedup_if_sampling_took_no_time": round(tokens / rest / trl["tokens_per_s"], 3),
            "sampling_seconds_for_target": round(tokens / (TARGETS["speedup"] * trl["tokens_per_s"]) - rest, 3)}


def judge_load(policy: str, prompts: list[str], *, batch_size: int, num_generations: int, answer_tokens: float) -> dict:
    """What one iteration of this shape asks of the judge with reward `judge:pairwise` (see the module docstring)."""
    from transformers import AutoTokenizer

    from cai.constitution import DEFAULT_CONSTITUTION, find_constitution, load_constitution
    from cai.train.rl.pairwise import pair_schedule

    tokenizer = AutoTokenizer.from_pretrained(policy)
    groups, pairs = batch_size // num_generations, len(pair_schedule(num_generations))
    principles = load_constitution(find_constitution(DEFAULT_CONSTITUTION)).principles
    lengths = [compare_prompt_tokens(tokenizer, principle, prompt, "", "") for principle in principles for prompt in prompts]
    template = sum(lengths) / len(lengths)
    per_prompt = template + 2 * answer_tokens
    engine_prompts = groups * pairs * 2
    return {
        "reward": "judge:pairwise (n_principles 1, no CoT)",
        "groups_per_iteration": groups,
        "pairs_per_group": pairs,
        "compare_requests_per_iteration": groups * pairs,
        "engine_prompts_per_iteration": engine_prompts,
        "template_and_prompt_tokens_mean": round(template, 1),
        "answer_tokens_mean": round(answer_tokens, 1),
        "prompt_tokens_per_engine_prompt": round(per_prompt, 1),
        "prompt_tokens_per_compare_request": round(2 * per_prompt, 1),
        "prompt_tokens_per_iteration": round(engine_prompts * per_prompt),
        "tokenizer": f"{policy} (the policy's, standing in for the judge's)",
        "principles_averaged": len(principles),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "grpo_throughput", batch_size=16, batch_help="answers per iteration (batch / K prompts)")
    ap.add_argument("--num-generations", type=int, default=4, help="K: answers per prompt")
    ap.add_argument("--unmerged-rollouts", action="store_true", help="cai samples through the unmerged adapter "
                    "(merged_rollouts: false), as TRL does: no merged copy of the adapted weights, slower decoding")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="both sides recompute each decoder layer's "
                    "activations in the backward (TRL's GRPO default; cai's gradient_checkpointing setting)")
    ap.add_argument("--bf16", action="store_true", help="both sides in bfloat16: autocast, frozen weights (policy base, "
                    "reward model) loaded in bf16, adapters and optimiser float32 (default: float32 on a CPU)")
    args = ap.parse_args(argv)
    if args.batch_size % args.num_generations or args.batch_size % args.mini_batches:
        ap.error(f"--batch-size ({args.batch_size}) must be divisible by --num-generations ({args.num_generations}) "
                 f"and by --mini-batches ({args.mini_batches})")

    import torch
    import trl

    report: dict = {
        "benchmark": "grpo_throughput",
        "settings": {"batch_size": args.batch_size, "num_generations": args.num_generations,
                     "prompts_per_iteration": args.batch_size // args.num_generations, "mini_batches": args.mini_batches,
                     "response_length": args.response_length, "ppo_epochs": args.ppo_epochs, "threads": args.threads,
                     "seed": args.seed, "lr": args.lr, "lora": "r=8 alpha=16 all-linear", "temperature": 1.0,
                     "beta": KL_COEF, "loss": "sequence (TRL loss_type grpo)", "scale_rewards": "group",
                     "reward": "seeded one-output reward model made from the policy", "repeats": args.repeats,
                     "cai_merged_rollouts": not args.unmerged_rollouts,
                     "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16},
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "trl": trl.__version__, "cuda": torch.cuda.is_available()},
    }
    k = ["--num-generations", str(args.num_generations)]

    def summary(runs: list[dict], policy: str) -> dict:
        answers = [t / args.batch_size for r in runs if r["trainer"] == "cai" for t in r["response_tokens_per_iteration"]]
        summarised = summarise(runs, TARGETS, "cai_grpo_source")
        return {**summarised, "sampling_bound": sampling_bound(summarised),
                "judge_load": judge_load(policy, DEFAULT_PROMPTS, batch_size=args.batch_size,
                                         num_generations=args.num_generations, answer_tokens=sum(answers) / len(answers))}

    if args.gradient_checkpointing:
        k.append("--gradient-checkpointing")
    if args.bf16:
        k.append("--bf16")
    cai_flags = [*k, "--unmerged-rollouts"] if args.unmerged_rollouts else k
    report["models"] = run_models(args, "grpo_throughput", SCRIPTS, {"cai": cai_flags, "trl": k}, summary)
    print_report(report, "grpo_throughput", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
