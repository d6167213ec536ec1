"""What `_cai_ppo.py` and `_trl_ppo.py` share, so the two sides of `ppo_throughput.py` are measured alike.

The knobs both take (`add_common_args`), the 64 default prompts, the reward model made from the policy
(a seeded one-output score head), reading every weight once before the resident set is taken (transformers
memory-maps checkpoints, so untouched weights are not resident yet), `ru_maxrss` in MiB, the result fields
both print, and `main`, which keeps stdout for the one JSON object.
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


def add_common_args(ap: argparse.ArgumentParser) -> None:
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
        "precision": "fp32 weights, bf16 autocast" if cuda else "fp32",
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
