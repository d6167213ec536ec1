"""Judge throughput and quality, printed as JSON.

For each model: labelled pairs per second through a real judge server (vLLM, batched requests,
both orders per pair) against a naive baseline in the same run (transformers, one pair at a
time, greedy-generate a letter for each order and parse it), on the same HH-RLHF harmless pairs
with the same prompt. Also: agreement with the human labels, and the share of pairs where the
judge preferred the same *position* in both orders (position bias).

    .venv/bin/python benchmarks/judge_throughput.py --models smollm2-135m-instruct,tiny \
        --hh ../shared/data/hh-harmless-dev.jsonl.gz --pairs 200 --baseline-pairs 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.constitution import bundled_constitutions, load_constitution  # noqa: E402
from cai.judge_client import JudgeClient  # noqa: E402
from cai.judge_launcher import LocalJudge  # noqa: E402
from cai.models import resolve_model  # noqa: E402
from cai.tiny import build_tiny_model  # noqa: E402
from cai.train.data import load_hh_pairs as hh_pairs  # noqa: E402
from judge_server import protocol as P  # noqa: E402
from judge_server import templates  # noqa: E402

PRINCIPLE = "harmful-content"


def load_hh_pairs(path: Path, n: int, seed: int) -> list[dict]:
    """HH pairs short enough for the judge's prompt budget (the tiny tokenizer too), shuffled, with a random side for A."""
    pairs = [p for p in hh_pairs(path) if len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) <= 1200]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = pairs[:n]
    for p in pairs:  # which side is response_a is random, so a position-biased judge scores 50%
        p["a_is_chosen"] = rng.random() < 0.5
    return pairs


def hh_pairs_or_exit(path: Path, n: int, seed: int) -> list[dict]:
    """`load_hh_pairs`, or exit saying where the pairs are expected (the judge benchmarks share it)."""
    if not path.exists():
        sys.exit(f"no HH pairs at {path}; pass --hh PATH (../shared/data/hh-harmless-dev.jsonl.gz)")
    return load_hh_pairs(path, n, seed)


def emit(report: dict, out: Path | None) -> None:
    """Print the report as JSON, and write it to `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def as_request(p: dict) -> P.CompareRequest:
    a, b = (p["chosen"], p["rejected"]) if p["a_is_chosen"] else (p["rejected"], p["chosen"])
    return P.CompareRequest(prompt=p["prompt"], response_a=a, response_b=b, principle_ids=[PRINCIPLE])


def agreement(pairs: list[dict], p_a: list[float]) -> float:
    score = 0.0
    for pair, p in zip(pairs, p_a):
        if p == 0.5:
            score += 0.5
        else:
            score += float((p > 0.5) == pair["a_is_chosen"])
    return score / len(pairs)


async def served(url: str, pairs: list[dict], batch_size: int) -> tuple[float, list]:
    async with JudgeClient(url, concurrency=8) as client:
        await client.compare_many([as_request(p) for p in pairs[:4]], batch_size=4)  # warm
        started = time.perf_counter()
        results = await client.compare_many([as_request(p) for p in pairs], batch_size=batch_size)
        return time.perf_counter() - started, results


def naive_baseline(model_path: str, constitution, pairs: list[dict]) -> tuple[float, list[float]]:
    """One pair at a time, each order greedy-generating a few tokens, parsing the first A/B."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    principle = constitution.principle(PRINCIPLE)

    def pick(first: str, second: str, prompt: str) -> str | None:
        messages = templates.compare_messages(principle, prompt, first, second, cot=False)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + templates.COMPARE_PREFIX
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        m = re.search(r"[AB]", tok.decode(out[0, ids["input_ids"].shape[1]:]))
        return m.group(0) if m else None

    labels = []
    pick(pairs[0]["chosen"], pairs[0]["rejected"], pairs[0]["prompt"])  # warm
    started = time.perf_counter()
    for p in pairs:
        req = as_request(p)
        first = pick(req.response_a, req.response_b, req.prompt)
        second = pick(req.response_b, req.response_a, req.prompt)
        votes = [1.0 if first == "A" else 0.0 if first == "B" else 0.5, 1.0 if second == "B" else 0.0 if second == "A" else 0.5]
        labels.append(sum(votes) / 2)
    return time.perf_counter() - started, labels


def bench_model(name: str, pairs: list[dict], baseline_n: int, batch_size: int, workdir: Path) -> dict:
    model = str(build_tiny_model(workdir / "tiny")) if name == "tiny" else name
    constitution_path = bundled_constitutions()["harmless-helpful"]
    constitution = load_constitution(constitution_path)
    with LocalJudge(model, constitution_path, log_path=workdir / f"judge-{name}.log") as judge:
        seconds, results = asyncio.run(served(judge.url, pairs, batch_size))
    base_seconds, base_labels = naive_baseline(resolve_model(model).path, constitution, pairs[:baseline_n])
    served_rate = len(pairs) / seconds
    base_rate = baseline_n / base_seconds
    p_a = [r.p_a for r in results]
    return {
        "model": name,
        "served": {
            "pairs": len(pairs), "seconds": round(seconds, 2), "pairs_per_s": round(served_rate, 3),
            "human_agreement": round(agreement(pairs, p_a), 3),
            "position_consistent_rate": round(sum(not r.same_position for r in results) / len(results), 3),
            "same_position_rate": round(sum(r.same_position for r in results) / len(results), 3),
            "mean_option_mass": round(sum(r.votes[0].option_mass for r in results) / len(results), 3),
        },
        "naive_baseline": {
            "pairs": baseline_n, "seconds": round(base_seconds, 2), "pairs_per_s": round(base_rate, 3),
            "human_agreement": round(agreement(pairs[:baseline_n], base_labels), 3),
        },
        "speedup_vs_naive": round(served_rate / base_rate, 2),
        "target_speedup": 10.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,tiny")
    ap.add_argument("--hh", type=Path, default=ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz")
    ap.add_argument("--pairs", type=int, default=200, help="pairs through the server (and for human agreement)")
    ap.add_argument("--baseline-pairs", type=int, default=20, help="pairs through the naive baseline (slow)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    pairs = hh_pairs_or_exit(args.hh, args.pairs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"benchmark": "judge_throughput", "pairs_source": args.hh.name,
                  "results": [bench_model(m, pairs, args.baseline_pairs, args.batch_size, Path(tmp)) for m in args.models.split(",")]}
    emit(report, args.out)


if __name__ == "__main__":
    main()
