"""What the trainer scripts of `ppo_throughput.py` and `grpo_throughput.py` share (`_cai_ppo.py`, `_trl_ppo.py`,
`_cai_grpo.py`, `_trl_grpo.py`), so both sides of each comparison are measured alike.

The knobs all take (`add_common_args`), the 64 default prompts, the reward model made from the policy
(a seeded one-output score head), reading every weight once before the resident set is taken (transformers
memory-maps checkpoints, so untouched weights are not resident yet), `ru_maxrss` in MiB, the result fields
all print, `main`, which keeps stdout for the one JSON object; for the cai side its inputs, job fields, timed
updates and result (`cai_inputs`, `cai_job_fields`, `time_updates`, `cai_run_result`), for TRL's the trainer
arguments and the iteration timer (`hf_trainer_args`, `iteration_timer`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "What causes rain?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Summarise the plot of Romeo and Juliet.",
    "What is a prime number?",
    "Give me a recipe for pancakes.",
    "How do vaccines work?",
    "What is the difference between weather and climate?",
    "Write a short poem about autumn.",
    "How can I improve my handwriting?",
    "What does a CPU do?",
    "Explain gravity to a child.",
    "What are the benefits of exercise?",
    "How do I make a cup of tea?",
    "Name three famous painters.",
    "What is the boiling point of water?",
    "How do bees make honey?",
    "Give me a fun fact about octopuses.",
    "What is the tallest mountain in the world?",
    "How should I prepare for a job interview?",
    "What is machine learning?",
    "Describe a sunset in two sentences.",
    "How do I plant tomatoes?",
    "What is the speed of light?",
    "Tell me a joke about cats.",
    "Why do leaves change colour in autumn?",
    "How does a bicycle stay upright?",
    "What is the largest ocean?",
    "Give me tips for learning a new language.",
    "What is democracy?",
    "How do I write a thank-you note?",
    "What is the water cycle?",
    "Explain what a budget is.",
    "How can I reduce stress?",
    "What are the primary colours?",
    "How does a rainbow form?",
    "Write a limerick about a dog.",
    "What is an atom?",
    "How do airplanes fly?",
    "What should I pack for a beach trip?",
    "What is the moon made of?",
    "How do I start running?",
    "Explain what a verb is.",
    "What is the population of the Earth?",
    "How do I keep houseplants alive?",
    "What is the history of the bicycle?",
    "Give me a motivational quote.",
    "How does the heart pump blood?",
    "What is a volcano?",
    "How do I save money on groceries?",
    "What is the meaning of the word 'ephemeral'?",
    "Describe the taste of an apple.",
    "How do magnets work?",
    "What is a good book for beginners to read?",
    "How do I tie a tie?",
    "What is the difference between a frog and a toad?",
    "Why do we need sleep?",
    "Plan a simple picnic for two.",
]


def add_common_args(ap: argparse.ArgumentParser, *, policy_help: str, reward_help: str) -> None:
    """The flags every trainer script takes: `--policy` and `--reward-model` (their help is the script's), then the shape."""
    ap.add_argument("--policy", required=True, help=policy_help)
    ap.add_argument("--reward-model", default=None, help=reward_help)
    ap.add_argument("--prompts", default=None, help='JSONL file of {"prompt": ...}; default: 64 built-in prompts')
    ap.add_argument("--batch-size", type=int, default=8, help="rollouts per iteration")
    ap.add_argument("--mini-batches", type=int, default=2, help="minibatches per PPO epoch (one optimiser step each)")
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=4, help="PPO iterations; the first is warm-up and not timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate (cai's PPO default)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept (the end of longer prompts)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice); on a busy CPU box 1 avoids OpenMP "
                         "spin contention, which can slow small matmuls a hundredfold")


def check_common_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.iterations < 2:
        ap.error("--iterations must be at least 2 (the first one is warm-up)")
    if args.batch_size % args.mini_batches:
        ap.error(f"--batch-size ({args.batch_size}) must be divisible by --mini-batches ({args.mini_batches})")
    return args


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_prompt_texts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    texts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"{path}:{n}: expected an object with a 'prompt' field")
        texts.append(str(row["prompt"]))
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts


def make_reward_model(policy: str, out_dir: str, pad_token_id: int | None, seed: int) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the fresh score head is drawn from this
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = pad_token_id
    rm.save_pretrained(out_dir)
    del rm
    return out_dir


def cai_inputs(args: argparse.Namespace, tmp_dir: str, log) -> tuple[str, int, str]:
    """(prompt file, how many prompts, reward-model folder) for a cai run: `--prompts` or the 64 built-in ones written
    to `tmp_dir`; `--reward-model` or one made from `--policy` with a seeded score head, with the tokenizer (cai's
    scorer reads the reward model's own)."""
    from transformers import AutoTokenizer

    prompts = args.prompts
    if prompts is None:
        prompts = os.path.join(tmp_dir, "prompts.jsonl")
        Path(prompts).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
    rm_dir = args.reward_model
    if rm_dir is None:
        tokenizer = AutoTokenizer.from_pretrained(args.policy)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rm_dir = make_reward_model(args.policy, os.path.join(tmp_dir, "rm"), pad, args.seed)
        tokenizer.save_pretrained(rm_dir)
        log(f"made a reward model from the policy with a seeded score head: {rm_dir}")
    return prompts, len(load_prompt_texts(prompts)), rm_dir


def cai_job_fields(args: argparse.Namespace, out_dir: str, prompts: str, reward: str) -> dict:
    """The fields of a cai RL job (`PPOJob`, `GRPOJob`) both cai scripts set alike: the flags, LoRA r=8 alpha=16
    all-linear, a fixed KL coefficient, no gold judge and no checkpoint or sample rows during the run."""
    return {"model": args.policy, "reward": reward, "prompts": prompts, "out": out_dir,
            "max_prompt_length": args.max_prompt_length, "iterations": args.iterations, "batch_size": args.batch_size,
            "mini_batches": args.mini_batches, "ppo_epochs": args.ppo_epochs, "response_length": args.response_length,
            "temperature": args.temperature, "adaptive_kl": False, "lr": args.lr, "lora_r": 8, "lora_alpha": 16,
            "lora_target_modules": "all-linear", "gold_judge_every": 0, "checkpoint_every": 10**9,
            "log_samples_every": 10**9, "seed": args.seed}


def time_updates(trainer, log) -> list[float]:
    """Wrap a cai `RLTrainer`'s `update` (the end of an iteration: train() calls update(rollout(i))) so that each
    iteration logs its seconds and tokens and appends `ru_maxrss` to the returned list as it returns (the final
    checkpoint, adapter save and loss plot come after the last one)."""
    import torch

    peaks: list[float] = []
    update = trainer.update

    def timed_update(rollout):
        out = update(rollout)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        peaks.append(max_rss_mib())
        log(f"iteration {rollout.iteration + 1}: {out[0]['seconds']:.2f}s, {out[0]['tokens']} tokens")
        return out

    trainer.update = timed_update
    return peaks


def hf_trainer_args(args: argparse.Namespace) -> dict:
    """The `transformers.TrainingArguments` both TRL baselines share: bf16 autocast on CUDA or with `--bf16`, no eval,
    no saving, no reporting, a log line per step, `--lr` and `--seed`."""
    import torch

    cuda = torch.cuda.is_available()
    return {"bf16": cuda or getattr(args, "bf16", False), "fp16": False, "use_cpu": not cuda, "eval_strategy": "no",
            "save_strategy": "no", "report_to": [],
            "logging_steps": 1, "disable_tqdm": True, "seed": args.seed, "dataloader_num_workers": 0,
            "learning_rate": args.lr}


def iteration_timer(steps_per_iteration: int, log, tokens: list[int], *, on_begin=None, on_iteration=None):
    """A transformers `TrainerCallback` timing a TRL trainer's iterations of `steps_per_iteration` steps; -> (callback,
    marks, peaks). `marks` gets `time.perf_counter()` at `on_train_begin` (after `on_begin()`) and at the last
    `on_step_end` of each iteration, where `peaks` gets `ru_maxrss` and `on_iteration()` runs before the iteration's
    log line (which shows `tokens[-1]`)."""
    import time

    import torch
    from transformers import TrainerCallback

    marks: list[float] = []
    peaks: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            if on_begin is not None:
                on_begin()
            marks.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            if state.global_step % steps_per_iteration:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            peaks.append(max_rss_mib())
            if on_iteration is not None:
                on_iteration()
            log(f"iteration {len(marks) - 1}: {marks[-1] - marks[-2]:.2f}s, {tokens[-1]} tokens")

    return Timer(), marks, peaks


PHASES = ("sample", "score", "evaluate", "update")
"""The parts of an iteration both sides' `phases_s` report (seconds, mean over the timed iterations): sampling the
answers (prefill and decoding), the reward model's pass, the no-grad log-prob passes (reference; TRL also the old
policy's), and the minibatch updates (forward, backward, optimiser step)."""
CAI_PHASES = dict(zip(PHASES, ("rollout", "score", "evaluate", "update")))
"""`PHASES` -> the `time/<name>_s` metric cai's RL trainers log for it."""


def cai_run_result(args: argparse.Namespace, out_dir: str, *, peaks: list[float], rss_after_load: float, trainable: int,
                   prompts: int) -> dict:
    """`common_result` for a cai run from its `metrics.jsonl` (first iteration dropped as warm-up), plus the answer
    tokens per iteration and the warm-up's seconds."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) != args.iterations:
        raise RuntimeError(f"expected {args.iterations} iterations in metrics.jsonl, saw {len(rows)}")
    timed = rows[1:]
    return {
        **common_result("cai", args, seconds=[r["seconds"] for r in timed], tokens=[r["tokens"] for r in timed],
                        peak_rss=peaks[-1], rss_after_load=rss_after_load, trainable=trainable, prompts=prompts),
        "lora": True,
        "response_tokens_per_iteration": [round(r["response/length_mean"] * args.batch_size) for r in timed],
        "rollout_seconds_per_iteration": [r["time/rollout_s"] for r in timed],
        "score_seconds_per_iteration": [r["time/score_s"] for r in timed],
        "phases_s": {phase: round(sum(r[f"time/{key}_s"] for r in timed) / len(timed), 3) for phase, key in CAI_PHASES.items()},
        "warmup_seconds": rows[0]["seconds"],
    }


def resident_after_reading(*modules) -> float:
    """Read every weight and buffer of `modules` once, then return the RSS (MiB); resets CUDA's peak."""
    import torch

    with torch.no_grad():
        for module in modules:
            if module is not None:
                for t in [*module.parameters(), *module.buffers()]:
                    t.sum()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return rss_mib()


def common_result(trainer: str, args: argparse.Namespace, *, seconds: list[float], tokens: list[int], peak_rss: float,
                  rss_after_load: float, trainable: int, prompts: int) -> dict:
    """The fields both scripts print; `seconds` and `tokens` are the timed iterations' (warm-up dropped)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "trainer": trainer,
        "policy": args.policy,
        "batch_size": args.batch_size,
        "mini_batches": args.mini_batches,
        "response_length": args.response_length,
        "ppo_epochs": args.ppo_epochs,
        "iterations_timed": len(seconds),
        "seconds_per_iteration": [round(s, 4) for s in seconds],
        "tokens_per_iteration": tokens,
        "tokens_per_s": round(sum(t / s for t, s in zip(tokens, seconds)) / len(seconds), 2),
        "peak_rss_mib": round(peak_rss, 1),
        "rss_after_load_mib": round(rss_after_load, 1),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "token_count": "actual",
        "peak_rss_process_mib": round(max_rss_mib(), 1),
        "device": "cuda" if cuda else "cpu",
        "precision": ("bf16 autocast, frozen weights in bf16" if getattr(args, "bf16", False)
                      else "fp32 weights, bf16 autocast" if cuda else "fp32"),
        "gradient_checkpointing": getattr(args, "gradient_checkpointing", False),
        "torch_threads": torch.get_num_threads(),
        "reward_model": args.reward_model or "made from policy (seeded score head)",
        "trainable_params": trainable,
        "prompts": prompts,
    }


def library_floor_mib() -> float:
    """RSS (MiB) once torch and transformers' model classes are imported, before any trainer code or model.

    Both trainers need these libraries (transformers' modeling code pulls in torch._dynamo, sympy and
    triton), so no transformers-based trainer's process can be smaller; for a tiny model this floor is
    most of the peak, and `peak - floor` is the memory the trainer itself adds.
    """
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    return rss_mib()


def main(run, args: argparse.Namespace, name: str) -> int:
    """Run `run(args)` with fd 1 sent to stderr (the trainers, rich and transformers print to stdout); then
    write its result, with the process's library floor, as the one JSON object on the real stdout."""
    floor = library_floor_mib()
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        result = run(args)
    except Exception as e:
        print(f"[{name}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        sys.stdout.flush()
    result["rss_floor_mib"] = round(floor, 1)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0
