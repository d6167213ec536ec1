"""The judge on an OpenAI-compatible backend (`--backend openai` over `vllm serve`) against its own in-process engine, as JSON.

Same model, same HH-RLHF harmless pairs, same batches, one after the other on this machine (the
baseline is the in-process engine): labelled pairs/s through each, their ratio, and how far the
backend's labels are from the in-process ones (they should agree to 1e-3: both read the option
tokens' exact log-probabilities from the same vLLM on the same prompt ids).

    .venv/bin/python benchmarks/judge_backend.py --model smollm2-135m-instruct --pairs 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from judge_throughput import agreement, emit, hh_pairs_or_exit, served  # noqa: E402

from cai.constitution import bundled_constitutions  # noqa: E402
from cai.judge_launcher import LocalJudge  # noqa: E402
from cai.models import resolve_model  # noqa: E402
from cai.tiny import build_tiny_model  # noqa: E402
from judge_server.settings import BackendSettings  # noqa: E402
from judge_server.vllm_serve import VLLMServer  # noqa: E402


def run(model: str, pairs: list[dict], batch_size: int, replicas: int, workdir: Path) -> dict:
    path = str(build_tiny_model(workdir / "tiny")) if model == "tiny" else resolve_model(model).path
    constitution = bundled_constitutions()["harmless-helpful"]
    with LocalJudge(path, constitution, log_path=workdir / "in-process.log") as judge:
        base_seconds, base = asyncio.run(served(judge.url, pairs, batch_size))
    servers = [VLLMServer(path, served_name="judge", log_path=workdir / f"vllm-{i}.log").start() for i in range(replicas)]
    try:
        backends = BackendSettings(backend="openai", backend_url=[s.url for s in servers], backend_model="judge", backend_tokenizer=path)
        with LocalJudge(path, constitution, log_path=workdir / "backend.log", backends=backends) as judge:
            seconds, remote = asyncio.run(served(judge.url, pairs, batch_size))
    finally:
        for s in servers:
            s.stop()
    diffs = [abs(a.p_a - b.p_a) for a, b in zip(base, remote)]
    order_diffs = [abs(a.p_a_shown_first - b.p_a_shown_first) for a, b in zip(base, remote)]
    rate, base_rate = len(pairs) / seconds, len(pairs) / base_seconds
    return {
        "model": model, "pairs": len(pairs), "batch_size": batch_size, "replicas": replicas, "cpu_count": os.cpu_count(),
        "in_process": {"seconds": round(base_seconds, 2), "pairs_per_s": round(base_rate, 3),
                       "human_agreement": round(agreement(pairs, [r.p_a for r in base]), 3)},
        "backend": {"seconds": round(seconds, 2), "pairs_per_s": round(rate, 3),
                    "human_agreement": round(agreement(pairs, [r.p_a for r in remote]), 3)},
        "backend_vs_in_process": round(rate / base_rate, 3),
        "max_abs_label_diff": max(diffs), "max_abs_first_order_diff": max(order_diffs),
        "labels_within_1e-3": max(diffs + order_diffs) <= 1e-3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--hh", type=Path, default=ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=1, help="vllm serve processes behind the judge")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    pairs = hh_pairs_or_exit(args.hh, args.pairs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"benchmark": "judge_backend", "baseline": "in-process vLLM engine", "pairs_source": args.hh.name,
                  **run(args.model, pairs, args.batch_size, args.replicas, Path(tmp))}
    emit(report, args.out)


if __name__ == "__main__":
    main()
