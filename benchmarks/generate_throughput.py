"""Rows per minute for `cai generate sft` and `cai generate prefs`, and where the time goes, as JSON.

One judge server (vLLM) is started for the model and shared by both jobs; each job samples from
the policy (vLLM offline engine by default) and asks the judge. A fresh judge cache, so every
answer is computed.

    .venv/bin/python benchmarks/generate_throughput.py --model smollm2-135m-instruct --prompts 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.constitution import bundled_constitutions  # noqa: E402
from cai.generate.prefs import PrefsJob, generate_prefs  # noqa: E402
from cai.generate.sft import SftJob, generate_sft  # noqa: E402
from cai.judge_launcher import LocalJudge  # noqa: E402
from cai.samples import SamplingConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--source", default="donotanswer+mtbench")
    ap.add_argument("--backend", default="auto", help="policy backend: auto, vllm, transformers")
    args = ap.parse_args()
    constitution = bundled_constitutions()["harmless-helpful"]
    report = {"benchmark": "generate_throughput", "model": args.model, "prompts": args.prompts, "source": args.source}
    with tempfile.TemporaryDirectory() as tmp, LocalJudge(args.model, constitution, log_path=Path(tmp) / "judge.log") as judge:
        tmp = Path(tmp)
        jobs = {
            "sft": (generate_sft, SftJob(prompts=args.source, out=tmp / "sft", policy=args.model, constitution=str(constitution),
                                         judge_url=judge.url, limit=args.prompts, rounds=2, sampling=SamplingConfig(max_new_tokens=128),
                                         critique_tokens=128, revision_tokens=128, policy_backend=args.backend,
                                         judge_cache=tmp / "cache.sqlite")),
            "prefs": (generate_prefs, PrefsJob(prompts=args.source, out=tmp / "prefs", policy=args.model, constitution=str(constitution),
                                               judge_url=judge.url, limit=args.prompts, samples=2,
                                               sampling=SamplingConfig(max_new_tokens=128, temperature=1.0), policy_backend=args.backend,
                                               judge_cache=tmp / "cache.sqlite")),
        }
        for name, (fn, job) in jobs.items():
            started = time.perf_counter()
            summary = fn(job)
            seconds = time.perf_counter() - started
            rows = summary["rows"] if name == "sft" else summary["pairs"]
            phases = summary["seconds"]
            busy = sum(phases.values())
            report[name] = {
                "rows": rows, "seconds_total": round(seconds, 1), "rows_per_minute": round(60 * rows / seconds, 2),
                "seconds_by_phase": phases, "share_policy": round(phases.get("policy", 0) / busy, 3),
                "share_judge": round(phases.get("judge", 0) / busy, 3), "setup_seconds": round(seconds - busy, 1),
                "failed": summary["failed_this_run"],
            }
            if name == "prefs":
                report[name]["summary"] = {k: summary[k] for k in ("label_entropy_bits", "position_consistency_rate", "mean_chars_chosen",
                                                                  "mean_chars_rejected", "longer_is_chosen_rate") if k in summary}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
