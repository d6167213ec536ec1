"""The end of a `cai generate prefs` job, writing its outputs from progress.jsonl, before and after it read the log a row at
a time: wall seconds and peak memory for N synthetic rows.

A synthetic progress.jsonl holds N rows shaped as `cai.generate.prefs` logs them (the same keys, provenance and types;
1% of them judge failures logged again later as ok, so an id's last row counts), each about `--row-kib` KiB (the
chosen and rejected answers fill it). A child process per version imports cai from that version's code (the working tree,
and `--before`, a commit whose `cai/` and `judge_server/` are extracted with `git archive`) and runs what a job runs after
its last row: open the log, then write prefs.jsonl, the `datasets` folder and summary.json (`write_prefs`). Reported
per version: the child's peak RSS (VmHWM, read by the child at its end: `ru_maxrss` from `wait4` counts the peak of the
parent too, which the child's vfork shared until exec), its RSS after the imports, the peak of RSS less shared
pages sampled every 0.1 s (the heap, `_rss.TreeSampler`), and the seconds the end took; then whether both versions
wrote the same prefs.jsonl (bytes), summary.json and dataset (features and rows).

    .venv/bin/python benchmarks/generate_outputs.py --rows 20000 100000 --out benchmarks/results/generate_outputs.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _rss import TreeSampler, print_report

END_OF_JOB = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import datasets, pyarrow  # noqa: F401  (imported before the figure taken as the start)
from cai.generate.prefs import PrefsJob, write_prefs
from cai.rowlog import RowLog

def status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

progress, out = Path(sys.argv[2]), Path(sys.argv[3])
before = status_mib("VmRSS")
started = time.perf_counter()
log = RowLog.open(progress)
streams = hasattr(RowLog, "__iter__")  # the log read a row at a time; before, write_prefs took the list of every row
write_prefs(PrefsJob(prompts="p", out=out), log if streams else log.final_rows(), {})
log.close()
print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "rss_mib_after_imports": round(before, 1),
                  "rss_mib_peak": round(status_mib("VmHWM"), 1), "reads_rows_one_at_a_time": streams}))
"""

COMPARE = """
import json, sys
from datasets import load_from_disk
a, b = load_from_disk(sys.argv[1]), load_from_disk(sys.argv[2])
print(json.dumps(a.features == b.features and len(a) == len(b) and a.data.table.equals(b.data.table)))
"""

WORDS = ["the", "a", "lock", "key", "door", "neighbour", "permission", "locksmith", "owner", "legal", "safe", "call", "ask", "help", "cannot", "should", "would", "could", "question", "answer", "because", "however", "instead", "explain", "risk", "harm", "careful", "police", "tenant", "landlord", "spare", "window"]


def write_progress(path: Path, rows: int, row_kib: float, seed: int = 0) -> dict:
    """N prefs rows as `cai.generate.prefs._row` logs them, the answers sized so a line is about `row_kib` KiB."""
    from cai import __version__
    from cai.samples import SamplingConfig

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(3000)) for _ in range(64)]
    provenance = {"constitution_name": "harmless-helpful", "constitution_hash": hashlib.sha256(b"c").hexdigest(),
                  "judge_model": "smollm2-135m-instruct", "cai_version": __version__, "policy_model": "smollm2-135m-instruct",
                  "sampling": SamplingConfig(temperature=1.0).as_dict(), "seed": 0, "samples": 2, "n_principles": 1,
                  "cot": False, "prompt_source": "prompts.jsonl"}
    answer = max(16, int((row_kib * 1024 - 800) / 1.875))  # rejected is 7/8 as long on average; the rest of a row ~800 bytes
    retried = []
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        def log(row: dict) -> None:
            nonlocal size
            line = json.dumps(row, ensure_ascii=False) + "\n"
            size += len(line.encode("utf-8"))
            f.write(line)

        for i in range(rows):
            pid = hashlib.sha256(f"q{i}".encode()).hexdigest()[:16]
            row = {"id": f"{pid}:0-1", "prompt_id": pid, "prompt": f"Question {i}: what should I know about a lock? " * rng.randint(1, 4),
                   "category": rng.choice(["harmful", "helpful", None]), "pairs_for_prompt": 1, "provenance": provenance}
            if rng.random() < 0.01:  # a judge failure, retried (logged again as ok) at the end of the job
                log({**row, "status": "judge_failed", "error": "judge: timeout", "chosen": None, "rejected": None})
                retried.append((i, row))
                continue
            log(_labelled(rng, i, row, texts, answer))
        for i, row in retried:
            log(_labelled(rng, i, row, texts, answer))
    return {"rows": rows, "lines": rows + len(retried), "progress_mib": round(size / 2**20, 1),
            "bytes_per_line": round(size / (rows + len(retried)))}


def _labelled(rng: random.Random, i: int, row: dict, texts: list[str], answer: int) -> dict:
    p_first, p_second = rng.random(), rng.random()
    p = (p_first + p_second) / 2
    start = rng.randrange(1000)
    return {**row, "status": "ok", "error": None, "chosen": f"{i}: " + rng.choice(texts)[start:start + answer],
            "rejected": f"{i}: " + rng.choice(texts)[start:start + answer - rng.randrange(answer // 4)],
            "p_chosen": max(p, 1 - p), "p_chosen_shown_first": p_first, "p_chosen_shown_second": p_second,
            "same_position": (p_first >= 0.5) != (p_second >= 0.5), "principle_ids": [rng.choice(["harm", "honesty", "helpful"])],
            "option_mass": rng.uniform(0.5, 1.0)}


def end_of_job(code: Path, progress: Path, out: Path) -> dict:
    """What the job does after its last row, in a child importing cai from `code`: its seconds and memory."""
    log = out.with_name(out.name + ".log")
    with open(log, "w+") as output:
        proc = subprocess.Popen([sys.executable, "-c", END_OF_JOB, str(code), str(progress), str(out)], stdout=output,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
        with TreeSampler(proc.pid, every=0.1) as sampler:
            proc.wait()
        output.seek(0)
        text = output.read()
    if proc.returncode != 0:
        raise SystemExit(f"the end of the job under {code} failed ({proc.returncode}):\n{text[-3000:]}")
    report = json.loads(text.strip().splitlines()[-1])
    report["anon_mib_peak_sampled"] = max((s["anon_mib"] for s in sampler.samples), default=None)
    return report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--row-kib", type=float, default=11.0, help="size of a logged row (JSON line)")
    ap.add_argument("--before", default="e90c1aa~1", help="the commit whose end of job held every row")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="generate-outputs-"))
    work.mkdir(parents=True, exist_ok=True)
    before = work / "before-code"
    shutil.rmtree(before, ignore_errors=True)
    before.mkdir()
    archive = subprocess.run(["git", "archive", args.before, "cai", "judge_server"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    report = {"benchmark": "generate_outputs", "before": subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT,
                                                                         check=True, capture_output=True, text=True).stdout.strip(),
              "row_kib": args.row_kib, "cpus": os.cpu_count(), "runs": []}
    try:
        for n in args.rows:
            progress = work / "progress.jsonl"
            started = time.perf_counter()
            run = write_progress(progress, n, args.row_kib)
            print(f"{n} rows: progress.jsonl {run['progress_mib']} MiB written in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
            outs = {}
            for name, code in (("before", before), ("after", ROOT)):
                outs[name] = work / f"out-{name}"
                shutil.rmtree(outs[name], ignore_errors=True)
                run[name] = end_of_job(code, progress, outs[name])
                print(f"  {name}: {run[name]}", file=sys.stderr, flush=True)
            a, b = outs["before"], outs["after"]
            run["same_prefs_jsonl"] = _sha256(a / "prefs.jsonl") == _sha256(b / "prefs.jsonl")
            run["same_summary"] = ({k: v for k, v in json.loads((a / "summary.json").read_text()).items() if k != "output"}
                                   == {k: v for k, v in json.loads((b / "summary.json").read_text()).items() if k != "output"})
            same = subprocess.run([sys.executable, "-c", COMPARE, str(a / "dataset"), str(b / "dataset")], check=True,
                                  capture_output=True, text=True)
            run["same_dataset"] = json.loads(same.stdout.strip().splitlines()[-1])
            report["runs"].append(run)
            for out in outs.values():
                shutil.rmtree(out)
            progress.unlink()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report, args.out)


if __name__ == "__main__":
    main()
