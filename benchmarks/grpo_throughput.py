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

`judge_load` answers what the same shape would cost a judge with the group-pairwise reward (`judge:pairwise`,
`cai.train.rewards.GroupPairwiseScorer`): per iteration, groups x pairs /v1/compare requests, each judged in both
orders (2 engine prompts per principle, 1 principle by default); and the prompt tokens of one engine prompt: the
compare template with the default constitution's principles and these prompts, chat-templated with the policy's
tokenizer (a stand-in for the judge's), plus the two answers at the cai runs' mean answer length.

    .venv/bin/python benchmarks/grpo_throughput.py --models tiny
    .venv/bin/python benchmarks/grpo_throughput.py --models smollm2-135m-instruct --repeats 1 --save
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _cai_grpo import KL_COEF
from _ppo_common import DEFAULT_PROMPTS
from ppo_throughput import build_reward_model, log, resolve_policy, run_trainer, summarise, wait_for_quiet

TARGETS = {"speedup": 1.5, "memory_ratio": 0.7}
SCRIPTS = {"cai": HERE / "_cai_grpo.py", "trl": HERE / "_trl_grpo.py"}


def judge_load(policy: str, prompts: list[str], *, batch_size: int, num_generations: int, answer_tokens: float) -> dict:
    """What one iteration of this shape asks of the judge with reward `judge:pairwise` (see the module docstring)."""
    from transformers import AutoTokenizer

    from cai.constitution import DEFAULT_CONSTITUTION, find_constitution, load_constitution
    from cai.train.rl.pairwise import pair_schedule
    from judge_server.templates import COMPARE_PREFIX, compare_messages

    tokenizer = AutoTokenizer.from_pretrained(policy)
    groups, pairs = batch_size // num_generations, len(pair_schedule(num_generations))
    principles = load_constitution(find_constitution(DEFAULT_CONSTITUTION)).principles
    lengths = []
    for principle in principles:
        for prompt in prompts:
            text = tokenizer.apply_chat_template(compare_messages(principle, prompt, "", "", cot=False), tokenize=False,
                                                 add_generation_prompt=True) + COMPARE_PREFIX
            lengths.append(len(tokenizer.encode(text, add_special_tokens=False)))
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
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"],
                    help="'tiny' (cai.tiny, built locally) or any name/folder cai.models.resolve_model takes")
    ap.add_argument("--batch-size", type=int, default=16, help="answers per iteration (batch / K prompts)")
    ap.add_argument("--num-generations", type=int, default=4, help="K: answers per prompt")
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=1, help="passes over each batch (TRL's num_iterations, mu)")
    ap.add_argument("--iterations", type=int, default=None, help="per run, first one warm-up (default: 4 for tiny, 3 otherwise)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each run (each run is alone on the machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--repeats", type=int, default=2, help="runs per trainer, in ABBA order (cai, trl, trl, cai, ...)")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine before each run")
    ap.add_argument("--quiet-cpu", type=float, default=20, help="'quiet' = other processes use under this percent of one core")
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/grpo_throughput_<models>[_<tag>].json")
    ap.add_argument("--tag", default=None, help="suffix for the saved file's name (runs with other settings)")
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
                     "reward": "seeded one-output reward model made from the policy", "repeats": args.repeats},
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "trl": trl.__version__, "cuda": torch.cuda.is_available()},
        "models": {},
    }
    order = [("cai", "trl") if k % 2 == 0 else ("trl", "cai") for k in range(args.repeats)]
    with tempfile.TemporaryDirectory(prefix="grpo_throughput_") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
        for name in args.models:
            policy = resolve_policy(name, tmp)
            rm = build_reward_model(policy, tmp / f"rm-{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}", args.seed)
            iterations = args.iterations or (4 if name == "tiny" else 3)
            flags = ["--policy", policy, "--reward-model", rm, "--prompts", str(prompts), "--batch-size", str(args.batch_size),
                     "--num-generations", str(args.num_generations), "--mini-batches", str(args.mini_batches),
                     "--response-length", str(args.response_length), "--ppo-epochs", str(args.ppo_epochs),
                     "--iterations", str(iterations), "--seed", str(args.seed), "--threads", str(args.threads),
                     "--lr", str(args.lr)]
            runs = []
            for trainer in [t for pair in order for t in pair]:
                quiet = wait_for_quiet(args.max_wait, args.quiet_cpu)
                load_before = [round(x, 2) for x in os.getloadavg()]
                result, other_cores, steal = run_trainer(SCRIPTS[trainer], flags)
                result.update(run=len(runs) + 1, load_before=load_before, other_cpu_cores=round(other_cores, 2),
                              steal_share=round(steal, 3), **quiet)
                log(f"{name} {trainer}: {result['tokens_per_s']} tokens/s, peak RSS {result['peak_rss_mib']} MiB "
                    f"(other processes {other_cores:.2f} cores)")
                runs.append(result)
            cai_answers = [t / args.batch_size for r in runs if r["trainer"] == "cai" for t in r["response_tokens_per_iteration"]]
            judge = judge_load(policy, DEFAULT_PROMPTS, batch_size=args.batch_size, num_generations=args.num_generations,
                               answer_tokens=sum(cai_answers) / len(cai_answers))
            report["models"][name] = {"policy": policy, "iterations": iterations,
                                      **summarise(runs, TARGETS, "cai_grpo_source"), "judge_load": judge, "runs": runs}
    text = json.dumps(report, indent=2)
    print(text)
    if args.save:
        slug = "_".join(re.sub(r"[^A-Za-z0-9_.-]", "-", Path(m).name if "/" in m else m) for m in args.models)
        if args.tag:
            slug += "_" + re.sub(r"[^A-Za-z0-9_.-]", "-", args.tag)
        path = HERE / "results" / f"grpo_throughput_{slug}.json"
        path.write_text(text + "\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
