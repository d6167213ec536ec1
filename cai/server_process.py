"""A server of our own in a child process: started in a session of its own on a loopback port, waited for
until its /health answers 200, stopped on exit (with everything it started). The judge launcher
(`cai.judge_launcher.LocalJudge`) and `vllm serve` replicas (`judge_server.vllm_serve`) are its subclasses.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx

from cai.errors import CaiError
from cai.files import log_tail

logger = logging.getLogger(__name__)


class ServerStartError(CaiError, RuntimeError):
    """The server exited or did not answer during its start-up; the message holds its log's tail or path."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in a child process of its own session on a loopback port: started, waited for until its /health answers
    200, stopped on exit. Subclasses give its `command()` and `environment()`; its output goes to `log_path`."""

    what = "server"  # how errors name it
    error: type[Exception] = ServerStartError

    def __init__(self, *, port: int | None = None, log_path: str | Path | None = None, start_timeout: float = 600.0,
                 log_prefix: str = "cai-server-"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=log_prefix, suffix=".log")[1])
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> Self:
        cmd, env = self.command(), self.environment()
        logger.info("starting %s: %s (log: %s)", self.what, " ".join(cmd), self.log_path)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = log_tail(self.log_path)
                raise self.error(f"{self.what} exited with code {self.process.returncode} during start-up; log tail:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise self.error(f"{self.what} not ready after {self.start_timeout:.0f} s; see {self.log_path}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The server and every process it started (they share the session started for it)."""
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
