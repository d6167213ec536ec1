"""What a `cai` job leaves behind when it is killed or interrupted: nothing. A real `cai generate sft` with its policy in
an in-process vLLM engine (tiny model, real judge) is stopped while its engine processes run, and every process it
started is counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import JUDGE_KEY

pytestmark = pytest.mark.slow


def _start_job(tmp_path, tiny_model_dir, judge_constitution, judge) -> tuple[subprocess.Popen, set[psutil.Process]]:
    """`cai generate sft` in a session of its own (as a shell runs it), once its vLLM engine core runs; with the
    processes it has started by then."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?"}) + "\n" for i in range(64)))
    cmd = [sys.executable, "-m", "cai.cli", "generate", "sft", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
           "--policy", str(tiny_model_dir), "--constitution", str(judge_constitution), "--judge-url", judge.url,
           "--rounds", "1", "--max-new-tokens", "8", "--critique-tokens", "24", "--revision-tokens", "24",
           "--policy-backend", "vllm", "--judge-cache", str(tmp_path / "c.sqlite")]
    env = {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY}
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    job = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        started = set(job.children(recursive=True))
        if any("EngineCore" in _title(p) for p in started):
            time.sleep(1.0)  # its workers too
            return proc, set(job.children(recursive=True))
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no vLLM engine core appeared; stderr tail:\n{(tmp_path / 'stderr.txt').read_text(errors='replace')[-3000:]}")


def _title(proc: psutil.Process) -> str:
    try:
        return proc.name() + " " + " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _left_after(started: set[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes of `started` still running after up to `seconds` (zombies count as gone); those are then killed."""
    deadline = time.monotonic() + seconds
    left = [p for p in started if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [p for p in left if _running(p)]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    return left


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_job_killed_with_sigkill_leaves_no_process_behind(tiny_model_dir, judge, judge_constitution, tmp_path):
    proc, started = _start_job(tmp_path, tiny_model_dir, judge_constitution, judge)
    os.kill(proc.pid, signal.SIGKILL)  # the job alone, as `kill -9 PID` does
    proc.wait()
    left = _left_after(started, 30)
    assert not left, f"left running after the job was killed: {[_title(p) for p in left]}"


def test_ctrl_c_stops_a_job_with_one_line_and_leaves_no_process_behind(tiny_model_dir, judge, judge_constitution, tmp_path):
    proc, started = _start_job(tmp_path, tiny_model_dir, judge_constitution, judge)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal sends: the job and its engine, not its own sessions
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _left_after(started, 0)
        raise
    stderr = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert rc == 130, stderr[-3000:]
    assert "interrupted: cai generate sft stopped; run the same command again to resume" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    left = _left_after(started, 30)
    assert not left, f"left running after the job was interrupted: {[_title(p) for p in left]}"
