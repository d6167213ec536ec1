"""The policy engine's own output goes to policy-engine.log in the job's folder; the terminal keeps cai's lines,
and an engine that fails shows its error and where its log is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import JUDGE_KEY, needs_vllm


def _generate(tmp_path, policy, judge_url: str, constitution) -> subprocess.CompletedProcess:
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about the sea."}) + "\n" for i in range(2)))
    cmd = [sys.executable, "-m", "cai.cli", "generate", "sft", "--prompts", str(src), "--out", str(tmp_path / "out"), "--policy",
           str(policy), "--constitution", str(constitution), "--judge-url", judge_url, "--policy-backend", "vllm",
           "--max-new-tokens", "8", "--judge-retries", "1", "--judge-cache", str(tmp_path / "cache.sqlite")]
    env = {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY, "COLUMNS": "500"}
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)


def test_vllm_policy_output_goes_to_the_engine_log_not_the_terminal(judge, tiny_model_dir, judge_constitution, tmp_path):
    result = _generate(tmp_path, tiny_model_dir, judge.url, judge_constitution)
    assert result.returncode == 0, result.stderr
    log = tmp_path / "out" / "policy-engine.log"
    terminal = result.stdout + result.stderr
    noise = [line for line in terminal.splitlines() if "WARNING" in line and ("vllm" in line or "EngineCore" in line or "Worker" in line)
             or "Triton" in line]
    assert noise == [], "\n".join(noise)
    assert f"policy engine log: {log}" in terminal
    text = log.read_text()
    assert "EngineCore" in text and "WARNING" in text


def test_a_policy_engine_that_fails_to_start_shows_its_error_and_log(tiny_model_dir, judge_constitution, tmp_path):
    needs_vllm()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # a cut-off download
    result = _generate(tmp_path, broken, "http://127.0.0.1:9", judge_constitution)
    log = tmp_path / "out" / "policy-engine.log"
    assert result.returncode != 0
    assert "policy engine failed while starting" in result.stderr
    assert "log tail:" in result.stderr and f"full log: {log}" in result.stderr
    assert "Traceback" in log.read_text()


def test_an_open_engine_log_takes_fd_2_vllm_logs_and_warnings_while_cai_keeps_the_terminal(tmp_path):
    script = """
import logging, os, sys, warnings
from cai.engine_logs import EngineLog
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
log = EngineLog(sys.argv[1]).open()
os.write(2, b"written to fd 2\\n")
logging.getLogger("vllm.engine").warning("vllm says")
warnings.warn("a library warns")
logging.getLogger("cai.job").info("cai says")
log.close()
logging.getLogger("cai.job").info("cai after")
assert "VLLM_LOGGING_STREAM" not in os.environ, "close() leaves the engine's logging variable set"
"""
    path = tmp_path / "engine.log"
    result = subprocess.run([sys.executable, "-c", script, str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"cai.engine_logs: policy engine log: {path}", "cai.job: cai says", "cai.job: cai after"]
    text = path.read_text()
    assert "written to fd 2" in text and "vllm says" in text and "a library warns" in text and "cai says" not in text


def test_a_handler_a_library_makes_while_the_log_is_open_writes_to_the_terminal_after_close(tmp_path):
    """transformers makes its StreamHandler(sys.stderr) on first use: made while the log was open, it held the temporary
    stderr whose descriptor close() shuts, and its next line was a 'Logging error ... Bad file descriptor' traceback."""
    script = """
import logging, sys
from cai.engine_logs import EngineLog
log = EngineLog(sys.argv[1]).open()
library = logging.getLogger("a_library")
library.addHandler(logging.StreamHandler())  # sys.stderr as it is now
library.propagate = False
logging.getLogger("another").addHandler(logging.lastResort)  # its stream is a property: it follows sys.stderr itself
log.close()
library.warning("library after")
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "engine.log")], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Logging error" not in result.stderr and "Bad file descriptor" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == "library after"
