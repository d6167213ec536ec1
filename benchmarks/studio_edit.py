"""How long from a saved edit of one principle to updated agreement figures in `cai studio`, against re-running
`cai judge eval` from scratch on the same constitution, as JSON.

One judge server (`cai judge serve`, the embedded SmolLM2-135M-Instruct by default) on a copy of a shipped
constitution (`--constitution`); the 48 shipped hh-harmless pairs, every pair judged under every principle in both
orders. An edit re-asks one principle's comparisons of the P principles' (48 of 48 P), so the ratio grows with P:

- studio (A): the real `cai studio` process on that file (`--judge-url`, its own answer cache); the version before
  the edit is measured first, untimed, as an author's session would have done. Timed from the PUT that saves a new
  wording of one principle's comparison question until `/api/people` reports the new version's figures.
- baseline (B): `cai judge eval --pairs hh-harmless --constitutions FILE --each-principle --judge-url URL` as a new
  process with an empty judge cache (cold), on the same file as last edited: the same comparisons, the same figures.

Runs alternate A B B A (ABBA; `--rounds N` repeats the block). Both ask the same running judge, so neither pays
the judge's start (30-40 s) and the baseline pays its process start-up, as a user re-running the command does.
The CPU is shared and noisy: compare the ratio, not the seconds.

    .venv/bin/python benchmarks/studio_edit.py --out benchmarks/results/studio_edit.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx

from cai.constitution import bundled_constitutions, load_constitution
from cai.judge_launcher import LocalJudge
from cai.models import DEFAULT_MODEL

OPENINGS = ["Thinking it over carefully:", "All things considered:", "Looking closely at both:", "On reflection:"]
"""Each studio run puts a new opening before the edited principle's comparison question, so its comparisons are new."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(path: Path, judge_url: str, work: Path, log) -> tuple[subprocess.Popen, httpx.Client]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", "studio", str(path), "--judge-url", judge_url, "--port", str(port),
                             "--pairs", "hh-harmless", "--judge-cache", str(work / "studio-cache.sqlite")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + 180
    while True:
        try:
            page = client.get("/")
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the studio did not start; see {work / 'studio.log'}") from None
            time.sleep(0.5)
    client.headers["X-Studio-Token"] = re.search(r'name="studio-token" content="([^"]+)"', page.text).group(1)
    return proc, client


def measure(client: httpx.Client) -> dict:
    """Start the against-people run of the version in service and wait for its figures."""
    client.post("/api/people/run").raise_for_status()
    while True:
        report = client.get("/api/people").json()
        if report["progress"]["state"] == "error":
            raise SystemExit(f"the studio's run failed: {report['progress']['error']}")
        if report["progress"]["state"] == "done" and report["current"]:
            return report
        time.sleep(0.2)


def studio_edit(client: httpx.Client, principle: str, original: str, opening: str) -> dict:
    """One timed edit: save a new wording of `principle`'s comparison question, then measure; seconds from the save to
    the figures."""
    view = client.get("/api/constitution").json()
    index = next(c["index"] for c in view["cards"] if c["id"] == principle)
    started = time.perf_counter()
    edit = {"index": index, "comparison": f"{opening} {original}"}
    saved = client.put("/api/constitution", json={"base": view["file_hash"], "edits": [edit]})
    saved.raise_for_status()
    report = measure(client)
    seconds = time.perf_counter() - started
    assert report["current"]["hash"] == saved.json()["in_service"]["hash"], "measured another version than the one saved"
    p = report["progress"]
    return {"seconds": round(seconds, 2), "asked": p["misses"], "from_cache": p["hits"],
            "agreement": report["current"]["figures"]["agreement"]["value"], "hash": report["current"]["hash"]}


def judge_eval(path: Path, judge_url: str, work: Path, i: int) -> dict:
    """`cai judge eval` from scratch (a new process, an empty judge cache) on the file as it is."""
    out = work / f"eval-{i}"
    cmd = [sys.executable, "-m", "cai.cli", "judge", "eval", "--pairs", "hh-harmless", "--constitutions", str(path),
           "--each-principle", "--judge-url", judge_url, "--out", str(out), "--judge-cache", str(work / f"eval-cache-{i}.sqlite")]
    started = time.perf_counter()
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cai judge eval failed:\n{done.stderr[-3000:]}")
    (report,) = json.loads((out / "judge-eval.json").read_text())["constitutions"].values()
    return {"seconds": round(seconds, 2), "agreement": report["agreement"]["value"], "hash": report["hash"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="The judge model (default: the embedded one).")
    ap.add_argument("--constitution", default="harmless-helpful", help="A shipped constitution (a copy is edited).")
    ap.add_argument("--principle", help="The principle each studio run rewords (default: the constitution's first).")
    ap.add_argument("--rounds", type=int, default=1, help="ABBA blocks (each: two studio edits, two cold judge evals).")
    ap.add_argument("--out", type=Path, help="Also write the JSON here.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "my.yaml"
        path.write_text(bundled_constitutions()[args.constitution].read_text(encoding="utf-8"), encoding="utf-8")
        constitution = load_constitution(path)
        principle = constitution.principle(args.principle or constitution.principles[0].id)
        with contextlib.ExitStack() as stack:
            judge = stack.enter_context(LocalJudge(args.model, path, log_path=work / "judge.log"))
            log = stack.enter_context(open(work / "studio.log", "w"))
            proc, client = start_studio(path, judge.url, work, log)
            try:
                started = time.perf_counter()
                first = measure(client)
                first_s = time.perf_counter() - started
                runs: list[dict] = []
                openings = iter(OPENINGS * args.rounds)
                for block in range(args.rounds):
                    for arm in "ABBA":
                        run = studio_edit(client, principle.id, principle.comparison, next(openings)) if arm == "A" else judge_eval(path, judge.url, work, len(runs))
                        runs.append({"arm": "studio" if arm == "A" else "judge_eval", "block": block, **run})
                        print(json.dumps(runs[-1]), file=sys.stderr)
            finally:
                client.close()
                proc.terminate()
                proc.wait(30)
    studio = [r["seconds"] for r in runs if r["arm"] == "studio"]
    cold = [r["seconds"] for r in runs if r["arm"] == "judge_eval"]
    # Each baseline run judged the file the studio had just measured: the same figures, or the comparison is void.
    last_studio = {i: next(r for r in reversed(runs[:i]) if r["arm"] == "studio") for i, r in enumerate(runs) if r["arm"] == "judge_eval"}
    same = all((runs[i]["agreement"], runs[i]["hash"]) == (s["agreement"], s["hash"]) for i, s in last_studio.items())
    report = {
        "what": "seconds from a saved edit of one principle to updated agreement figures in cai studio, against cai judge eval "
                "--each-principle re-run from scratch (new process, empty judge cache) on the same constitution; runs ABBA",
        "model": args.model, "constitution": args.constitution, "principles": len(constitution.principles),
        "edited": f"{principle.id}: a new opening before its comparison question per studio run",
        "pairs": "hh-harmless", "n_pairs": first["n_pairs"], "comparisons_per_full_measure": first["progress"]["total"],
        "studio_first_measure_seconds": round(first_s, 2),
        "runs": runs,
        "studio_seconds_median": statistics.median(studio), "judge_eval_seconds_median": statistics.median(cold),
        "ratio_judge_eval_over_studio": round(statistics.median(cold) / statistics.median(studio), 2),
        "ratio_per_abba_block": [round(statistics.mean(cold[2 * b:2 * b + 2]) / statistics.mean(studio[2 * b:2 * b + 2]), 2)
                                 for b in range(args.rounds)],
        "same_figures_as_judge_eval": same,
        "note": "one judge server (vLLM on CPU) for both arms, so neither pays its start; the machine's 2 CPU cores are shared "
                "with other work and noisy: the ratio is the figure, not the seconds",
        "cpus": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
