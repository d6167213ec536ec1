"""A long `cai generate prefs` run (20,000+ prompts) against OpenAI-compatible servers that answer at once, as JSON.

So that cai itself is what is measured, the model servers are `tests/fake_openai.py` (mode "varied": distinct answers
per sample, log-probs for the judge) in their own processes: the policy is sampled from one through
`--policy-backend openai`, and a real judge server (`cai judge serve` on loopback) asks another through its
`--backend openai` (the tiny model's tokenizer renders its prompts). The job runs as a user runs it, the `cai` CLI in
a subprocess. Reported: rows/s; the CPU seconds of the cai process tree against the wall (resource usage of the
waited-for tree, and psutil's last reading of each of its processes); its RSS and anonymous memory sampled every
`--sample-every` s with the slope over the second half of the generation in MiB per 1,000 rows (flat: memory levels
off; writing the outputs at the end is reported apart, and measured alone by `generate_outputs.py`); the judge cache's size on
disk and lookup time at that size against a cache of 1,000 answers; the time a rerun of the same command takes to
skip every finished row, and the time the resume check (read the log, find what is left) takes for the first
quarter, half and whole log (linear, not quadratic, in rows).

    .venv/bin/python benchmarks/generate_long.py --prompts 20000 --out benchmarks/results/generate_long.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from _rss import TreeSampler, print_report, second_half_slope  # noqa: E402

from cai.constitution import bundled_constitutions  # noqa: E402
from cai.generate.prefs import prompts_to_do  # noqa: E402
from cai.judge_cache import JudgeCache  # noqa: E402
from cai.judge_launcher import LocalJudge  # noqa: E402
from cai.prompts import load_prompts  # noqa: E402
from cai.rowlog import RowLog  # noqa: E402
from cai.tiny import build_tiny_model  # noqa: E402
from judge_server import protocol as P  # noqa: E402
from judge_server.settings import BackendSettings  # noqa: E402

SERVE_FAKE = """
import sys, time
sys.path.insert(0, {root!r})
from tests.fake_openai import FakeOpenAI
with FakeOpenAI("varied") as fake:
    print(fake.url, flush=True)
    while True:
        time.sleep(3600)
"""
TOPICS = ["bread", "taxes", "a lock", "the moon", "a virus", "chess", "my neighbour", "a password", "rust", "grief"]


@contextmanager
def fake_server():
    """A FakeOpenAI server in a process of its own (it answers at once; its CPU is not the client's)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE_FAKE.format(root=str(ROOT))], stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(10)


def write_prompts(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            text = f"Question {i}: what should I know about {rng.choice(TOPICS)}? " + "Please be thorough. " * rng.randint(0, 6)
            f.write(json.dumps({"id": f"q{i}", "prompt": text.strip()}) + "\n")


class LineCounter:
    """Rows written so far: newlines in the growing progress log, read from where the last count stopped."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def __call__(self) -> int:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            self.lines += chunk.count(b"\n")
        return self.lines


def run_cai(cmd: list[str], log: Path, progress_path: Path, every: float, total: int | None) -> dict:
    """Run the job, sampling its tree; CPU from the resource usage of waited-for children (this process has no other
    child that ends meanwhile) and from psutil's last reading of each process."""
    counter = LineCounter(progress_path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    last_print = started
    with TreeSampler(proc.pid, every=every, progress=counter) as sampler:
        while proc.poll() is None:
            time.sleep(0.5)
            if total and time.monotonic() - last_print >= 30 and sampler.samples:
                last_print = time.monotonic()
                s, elapsed = sampler.samples[-1], last_print - started
                rate = s["progress"] / elapsed
                eta = (total - s["progress"]) / rate if rate else float("nan")
                print(f"{s['progress']}/{total} rows, {rate:.1f} rows/s, RSS {s['rss_mib']} MiB, ETA {eta:.0f} s",
                      file=sys.stderr, flush=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_share_of_wall": round(cpu / wall, 3),
            "cpu_s_psutil_last_seen": round(sum(sampler.cpu_seconds.values()), 1), "samples": sampler.samples}


def cache_figures(path: Path, lookups: int = 2000) -> dict:
    """Size on disk of the judge cache and its lookup time (hits and misses), against a copy holding 1,000 answers."""
    def time_lookups(db: Path, keys: list[str]) -> float:
        cache = JudgeCache(db)
        try:
            started = time.perf_counter()
            for k in keys:
                cache.get(k, P.CompareResult)
            return (time.perf_counter() - started) / len(keys) * 1e6
        finally:
            cache.close()

    con = sqlite3.connect(path)
    entries = con.execute("SELECT count(*) FROM answers").fetchone()[0]
    keys = [k for (k,) in con.execute("SELECT key FROM answers ORDER BY random() LIMIT ?", (lookups,))]
    small_rows = con.execute("SELECT key, value FROM answers LIMIT 1000").fetchall()
    con.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    misses = [f"{random.getrandbits(256):064x}" for _ in range(lookups)]
    small = path.with_name("small-cache.sqlite")
    con = sqlite3.connect(small)
    con.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.executemany("INSERT INTO answers VALUES (?, ?)", small_rows)
    con.commit()
    con.close()
    small_keys = [k for k, _ in small_rows] * (lookups // max(1, len(small_rows)) + 1)
    return {"entries": entries, "bytes_on_disk": size, "mib_on_disk": round(size / 2**20, 2),
            "lookup_hit_us": round(time_lookups(path, keys), 1), "lookup_miss_us": round(time_lookups(path, misses), 1),
            "lookup_hit_us_at_1000_entries": round(time_lookups(small, small_keys[:lookups]), 1),
            "lookup_miss_us_at_1000_entries": round(time_lookups(small, misses), 1)}


def resume_check_seconds(progress: Path, prompts_file: Path, work: Path, repeats: int = 5) -> dict:
    """CPU seconds (the least of `repeats`, what others' load on the machine disturbs least) to open the log and find the
    prompts left (what a rerun does first), for the first 1/4, 1/2 and all rows."""
    lines = progress.read_bytes().splitlines(keepends=True)
    prompts = load_prompts(str(prompts_file), seed=0, shuffle=True)
    out = {}
    for part in (len(lines) // 4, len(lines) // 2, len(lines)):
        partial = work / f"progress-{part}.jsonl"
        partial.write_bytes(b"".join(lines[:part]))
        took = []
        for _ in range(repeats):
            started = time.process_time()
            with RowLog.open(partial) as log:
                left = prompts_to_do(log, prompts)
            took.append(time.process_time() - started)
        out[str(part)] = {"cpu_seconds": round(min(took), 3), "us_per_row": round(min(took) / max(1, part) * 1e6, 1),
                          "prompts_left": len(left)}
        partial.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=2, help="answers per prompt (one pair per prompt at 2)")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--sample-every", type=float, default=3.0, help="seconds between RSS samples")
    ap.add_argument("--work", type=Path, default=None, help="keep the run's folder here (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = ap.parse_args()
    with ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        tiny = build_tiny_model(work / "tiny")
        prompts_file, out, cache = work / "prompts.jsonl", work / "prefs", work / "judge-cache.sqlite"
        write_prompts(prompts_file, args.prompts)
        policy_url, backend_url = stack.enter_context(fake_server()), stack.enter_context(fake_server())
        backends = BackendSettings(backend="openai", backend_url=[backend_url], backend_model="fake", backend_tokenizer=str(tiny))
        judge = stack.enter_context(LocalJudge(str(tiny), bundled_constitutions()["harmless-helpful"],
                                               log_path=work / "judge.log", backends=backends))
        cmd = [str(Path(sys.executable).with_name("cai")), "generate", "prefs", "--prompts", str(prompts_file), "--out", str(out),
               "--samples", str(args.samples), "--chunk-size", str(args.chunk_size), "--judge-url", judge.url,
               "--judge-cache", str(cache), "--policy", "fake", "--policy-backend", "openai", "--policy-url", policy_url]
        print(f"generate: {args.prompts} prompts; {' '.join(cmd)}", file=sys.stderr, flush=True)
        with TreeSampler(judge.process.pid, every=args.sample_every) as judge_sampler:
            first = run_cai(cmd, work / "cai.log", out / "progress.jsonl", args.sample_every, args.prompts)
        summary = json.loads((out / "summary.json").read_text())
        rows = (out / "progress.jsonl").read_bytes().count(b"\n")
        print("rerun: skipping every finished row", file=sys.stderr, flush=True)
        rerun = run_cai(cmd, work / "cai-rerun.log", out / "progress.jsonl", args.sample_every, None)
        samples = first.pop("samples")
        # The generation phase: up to the sample that saw the last row; after it the job writes its outputs (all rows).
        making = samples[:next((i for i, s in enumerate(samples) if s["progress"] >= rows), len(samples))]
        half = making[len(making) // 2:]
        report = {
            "benchmark": "generate_long", "command": " ".join(cmd), "prompts": args.prompts, "samples": args.samples,
            "chunk_size": args.chunk_size, "rows": rows, "status": summary.get("status"), "seconds_by_phase": summary.get("seconds"), "cpus": os.cpu_count(),
            "rows_per_s": round(rows / first["wall_s"], 1), **first,
            "rss_mib_peak_generating": max(s["rss_mib"] for s in making),
            "rss_mib_second_half_min_max": [min(s["rss_mib"] for s in half), max(s["rss_mib"] for s in half)],
            "rss_slope_second_half_mib_per_1000_rows": second_half_slope(making, "progress", "rss_mib", scale=1000),
            "anon_mib_second_half_min_max": [min(s["anon_mib"] for s in half), max(s["anon_mib"] for s in half)],
            "anon_slope_second_half_mib_per_1000_rows": second_half_slope(making, "progress", "anon_mib", scale=1000),
            "rss_mib_peak_writing_outputs": max(s["rss_mib"] for s in samples[len(making):]) if len(samples) > len(making) else None,
            "judge_server_rss_slope_second_half_mib_per_min": second_half_slope(judge_sampler.samples, "t_s", "rss_mib", scale=60),
            "judge_server_anon_slope_second_half_mib_per_min": second_half_slope(judge_sampler.samples, "t_s", "anon_mib", scale=60),
            "judge_server_cpu_s": round(sum(judge_sampler.cpu_seconds.values()), 1),
            "judge_cache": cache_figures(cache),
            "rerun": {k: v for k, v in rerun.items() if k != "samples"},
            "resume_check": resume_check_seconds(out / "progress.jsonl", prompts_file, work),
            "rss_samples": samples,
        }
    print_report(report, args.out)


if __name__ == "__main__":
    main()
