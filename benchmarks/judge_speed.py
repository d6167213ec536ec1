"""Where the judge's time goes per labelled pair, and how near it runs to this machine's ceiling, as JSON.

For the same model and HH-RLHF harmless pairs, measured in one run:

- tokens per pair: each pair is judged in both orders, two prompts; how many tokens the two share at
  the start (the prefix cache can skip them in the second), and how many every comparison shares
  (chat template, instructions: computed once for the whole run)
- the served judge (vLLM, batched /v1/compare/batch) with prefix caching on and off: pairs/s, prompt
  tokens per pair, the share found in the prefix cache (the engine's own count), prompt tokens/s
- the ceiling (the baseline): a plain batched float32 transformers forward over inputs as long as
  the judge's prompts, every core, only the last position's logits (what reading the options needs)
- served prompt tokens/s over the ceiling (the target is at least 0.7), and the tokens actually
  computed per second over it

    .venv/bin/python benchmarks/judge_speed.py --model smollm2-135m-instruct --pairs 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402
from judge_throughput import PRINCIPLE, as_request, emit, hh_pairs_or_exit  # noqa: E402

from cai.constitution import bundled_constitutions, load_constitution  # noqa: E402
from cai.judge_client import JudgeClient  # noqa: E402
from cai.judge_launcher import LocalJudge  # noqa: E402
from cai.models import load_tokenizer, resolve_model  # noqa: E402
from cai.tiny import build_tiny_model  # noqa: E402
from judge_server import templates  # noqa: E402


def token_shapes(path: str, pairs: list[dict]) -> dict:
    """Prompt tokens of both orders per pair, what the two orders share, and what every comparison shares."""
    tok = load_tokenizer(path)
    principle = load_constitution(bundled_constitutions()["harmless-helpful"]).principle(PRINCIPLE)

    def ids(req, first, second):
        messages = templates.compare_messages(principle, req.prompt, first, second, cot=False)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + templates.COMPARE_PREFIX
        return tok.encode(text, add_special_tokens=False)

    per_pair, shared_orders, all_prompts = [], [], []
    for p in pairs:
        req = as_request(p)
        one, two = ids(req, req.response_a, req.response_b), ids(req, req.response_b, req.response_a)
        per_pair.append(len(one) + len(two))
        shared_orders.append(_common(one, two))
        all_prompts += [one, two]
    everywhere = min(_common(all_prompts[0], other) for other in all_prompts[1:])
    return {"prompt_tokens_per_pair": statistics.mean(per_pair), "prompt_tokens_per_prompt": statistics.mean(per_pair) / 2,
            "shared_by_the_two_orders": statistics.mean(shared_orders), "shared_by_every_comparison": everywhere,
            "longest_prompt": max(len(x) for x in all_prompts)}


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokens(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^judge_tokens_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


def served(path: str, pairs: list[dict], batch_size: int, prefix_caching: bool, log: Path, extra: list[str]) -> dict:
    args = ([] if prefix_caching else ["--no-prefix-caching"]) + extra
    constitution = bundled_constitutions()["harmless-helpful"]
    with LocalJudge(path, constitution, log_path=log, extra_args=args) as judge:
        async def go() -> float:
            async with JudgeClient(judge.url, concurrency=8) as client:
                before = _tokens(judge.url)
                started = time.perf_counter()
                await client.compare_many([as_request(p) for p in pairs], batch_size=batch_size)
                return time.perf_counter() - started, before

        seconds, before = asyncio.run(go())
        after = _tokens(judge.url)
    prompt = after.get("prompt", 0) - before.get("prompt", 0)
    cached = after.get("cached", 0) - before.get("cached", 0)
    return {"prefix_caching": prefix_caching, "seconds": round(seconds, 2), "pairs_per_s": round(len(pairs) / seconds, 3),
            "prompt_tokens_per_pair": round(prompt / len(pairs), 1), "cached_share": round(cached / prompt, 3) if prompt else None,
            "prompt_tokens_per_s": round(prompt / seconds, 1), "computed_tokens_per_s": round((prompt - cached) / seconds, 1)}


def ceiling(path: str, length: int, batch: int, reps: int) -> dict:
    """A plain batched float32 forward over `batch` x `length` tokens, every core, last-position logits only."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(100, model.config.vocab_size - 100, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids, logits_to_keep=1)  # warm
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            model(ids, logits_to_keep=1)
            times.append(time.perf_counter() - started)
    best = min(times)
    return {"batch": batch, "length": length, "threads": torch.get_num_threads(), "seconds_best": round(best, 3),
            "tokens_per_s": round(batch * length / best, 1), "tokens_per_s_median": round(batch * length / statistics.median(times), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--hh", type=Path, default=ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ceiling-batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-args", default="", help="more judge server flags, e.g. '--block-size 32'")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    pairs = hh_pairs_or_exit(args.hh, args.pairs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_model(Path(tmp) / "tiny")) if args.model == "tiny" else resolve_model(args.model).path
        shapes = token_shapes(path, pairs)
        runs = [served(path, pairs, args.batch_size, on, Path(tmp) / f"judge-{on}.log", args.judge_args.split()) for on in (True, False)]
        top = ceiling(path, round(shapes["prompt_tokens_per_prompt"]), args.ceiling_batch, args.reps)
    report = {"benchmark": "judge_speed", "baseline": "batched float32 transformers forward (the ceiling)", "model": args.model,
              "pairs": len(pairs), "cpu_count": os.cpu_count(), "judge_args": args.judge_args, "tokens": shapes, "served": runs, "ceiling": top,
              "served_prompt_tokens_per_s_vs_ceiling": {("cache_on" if r["prefix_caching"] else "cache_off"):
                                                        round(r["prompt_tokens_per_s"] / top["tokens_per_s"], 3) for r in runs},
              "computed_tokens_per_s_vs_ceiling": {("cache_on" if r["prefix_caching"] else "cache_off"):
                                                   round(r["computed_tokens_per_s"] / top["tokens_per_s"], 3) for r in runs},
              "target_vs_ceiling": 0.7}
    emit(report, args.out)


if __name__ == "__main__":
    main()
