"""The watchdog that ends every process a `cai` job started once the job ends, however it ends (SIGKILL included).

`watch(os.getpid())` starts `python -m cai.reaper JOB_PID` in a session of its own (so neither Ctrl-C at the
terminal nor a kill of the job's process group reaches it). Every half second it notes the job's descendants; once
the job is gone it sends SIGTERM to those still running (and to anything they started since), waits a few seconds,
sends SIGKILL to the rest and exits. A vLLM engine core and its workers, a judge server in its own session: all are
descendants by parent pid, so all are covered. Processes are matched by pid and start time, so a reused pid is spared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 5.0


def watch(job_pid: int) -> subprocess.Popen:
    """Start the watchdog for `job_pid` (the calling process, as a rule); it outlives the job by the seconds it takes
    to stop what the job left behind."""
    return subprocess.Popen([sys.executable, "-m", "cai.reaper", str(job_pid)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _descendants(proc: psutil.Process) -> dict[tuple[int, float], psutil.Process]:
    """`proc`'s descendants by (pid, start time), the watchdog itself left out."""
    found = {}
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            if child.pid != os.getpid():
                found[(child.pid, child.create_time())] = child
        except psutil.Error:
            continue
    return found


def reap(left: dict[tuple[int, float], psutil.Process], grace: float = GRACE_S) -> None:
    """SIGTERM the processes in `left` that still run, and whatever they started; SIGKILL those alive after `grace` s."""
    for proc in list(left.values()):
        left.update(_descendants(proc))
    alive = [p for p in left.values() if p.is_running()]  # is_running compares the start time: a reused pid is not ours
    for proc in alive:
        try:
            proc.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace)


def _running(proc: psutil.Process) -> bool:
    """Whether `proc` runs (a zombie, exited but not yet waited for, counts as gone)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run(job_pid: int) -> None:
    """Note `job_pid`'s descendants until it is gone, then reap them."""
    try:
        job = psutil.Process(job_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[tuple[int, float], psutil.Process] = {}
    while _running(job):
        seen.update(_descendants(job))
        seen = {k: p for k, p in seen.items() if p.is_running()}
        time.sleep(POLL_S)
    reap(seen)


if __name__ == "__main__":
    run(int(sys.argv[1]))
