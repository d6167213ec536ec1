"""Start vLLM's own OpenAI-compatible server (what `vllm serve` runs) for a local model on loopback.

A backend for `--backend openai` on this machine: the tests start one to stand for the server a team
already runs, the backend benchmark measures against one. The engine flags are those of every cai
vLLM engine (`cai.models.vllm_engine_args`: float32, eager mode and a fixed KV cache on a CPU).

    with VLLMServer("/path/to/model", served_name="judge") as server:
        ... server.url ...

The key for `--api-key` is passed through the environment (VLLM_API_KEY), never on the command line.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cai.judge_client import free_port

logger = logging.getLogger(__name__)


class VLLMServeError(RuntimeError):
    pass


class VLLMServer:
    def __init__(self, model: str | Path, *, served_name: str | None = None, port: int | None = None, api_key: str | None = None,
                 max_model_len: int = 2048, kv_cache_gib: float = 0.5, log_path: str | Path | None = None,
                 start_timeout: float = 600.0):
        self.model = str(model)
        self.served_name = served_name or self.model
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.max_model_len, self.kv_cache_gib = max_model_len, kv_cache_gib
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        from cai.models import vllm_engine_args

        args = vllm_engine_args(max_model_len=self.max_model_len, gpu_memory_utilization=0.85, kv_cache_gib=self.kv_cache_gib)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--served-model-name",
               self.served_name, "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0"]
        for key, value in args.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                cmd.append(flag if value else f"--no-{key.replace('_', '-')}")
            else:
                cmd += [flag, str(value)]
        return cmd

    def start(self) -> VLLMServer:
        cmd = self.command()
        env = dict(os.environ)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise VLLMServeError(f"vllm serve exited with code {self.process.returncode} during start-up; log tail:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.kill()
        raise VLLMServeError(f"vllm serve not ready after {self.start_timeout:.0f} s; see {self.log_path}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The server and its engine process (they share the session started for them)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
