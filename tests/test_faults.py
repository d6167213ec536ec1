"""Faults: the judge server killed with SIGKILL in the middle of `cai generate prefs`, then restarted; the job that
started a judge killed with SIGKILL, and its judge stopping by itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cai.judge_launcher import LocalJudge
from cai.server_process import free_port
from tests.conftest import JUDGE_KEY

pytestmark = pytest.mark.slow


def _count_lines(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_judge_killed_mid_prefs_run_then_rerun_has_every_row_once(tiny_model_dir, judge_constitution, tmp_path):
    port = free_port()
    env = {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY}
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about the sea."}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cai.cli", "generate", "prefs", "--prompts", str(src), "--out", str(out), "--policy", str(tiny_model_dir),
           "--constitution", str(judge_constitution), "--judge-url", f"http://127.0.0.1:{port}", "--samples", "2",
           "--max-new-tokens", "8", "--chunk-size", "1", "--policy-backend", "transformers", "--judge-retries", "2",
           "--judge-cache", str(tmp_path / "cache.sqlite")]
    progress = out / "progress.jsonl"

    first = LocalJudge(str(tiny_model_dir), judge_constitution, port=port, log_path=tmp_path / "judge1.log", env=env).start()
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _count_lines(progress) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before the judge could be killed"
        os.killpg(first.process.pid, signal.SIGKILL)  # the server and its engine process, as kill -9 would
        first.process.wait()
        _, stderr = job.communicate(timeout=300)  # the job runs on, records the failures, and ends
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    rows = [json.loads(line) for line in progress.read_text().splitlines()]
    assert any(r["status"] == "judge_failed" for r in rows), "no failure was recorded while the judge was down"
    failed = [r for r in rows if r["status"] == "judge_failed"]
    assert all("unreachable" in r["error"] or "still answering" in r["error"] for r in failed)

    with LocalJudge(str(tiny_model_dir), judge_constitution, port=port, log_path=tmp_path / "judge2.log", env=env):
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_this_run"] == 0
    final = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    prompt_ids = {r["prompt_id"] for r in final}
    no_pair = {r["prompt_id"] for r in rows if r["status"] == "no_pair"}
    assert len(prompt_ids | no_pair) == 8  # every prompt has its row
    assert len({r["id"] for r in final}) == len(final)  # and exactly once
    assert all(r["status"] == "ok" for r in final)


def test_a_judge_started_by_a_job_stops_when_the_job_is_killed(tiny_model_dir, judge_constitution, tmp_path):
    """SIGKILL leaves a job no chance to stop the judge it started; the judge notices its parent is gone and exits."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, signal, sys\n"
        "from cai.judge_launcher import LocalJudge\n"
        f"judge = LocalJudge({str(tiny_model_dir)!r}, {str(judge_constitution)!r}, log_path={str(tmp_path / 'judge.log')!r}).start()\n"
        "print(judge.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    job = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert job.returncode == -signal.SIGKILL, job.stderr[-2000:]
    server = int(job.stdout.split()[0])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _alive(server):
        time.sleep(0.5)
    alive = _alive(server)
    if alive:
        os.killpg(server, signal.SIGKILL)
    assert not alive, "the judge server outlived the job that started it"
    assert "is gone: stopping" in (tmp_path / "judge.log").read_text(errors="replace")


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
