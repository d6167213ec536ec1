"""Starting a judge of our own: `LocalJudge` runs the judge service (what `cai judge serve` runs) for a local
model in a child process on a loopback port (`cai.server_process.ServerProcess`), stopped on exit.
`judge_endpoint` is the one place a job turns "a URL or a model" into a judge URL. The HTTP client is
`cai.judge_client`'s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cai.judge_client import JudgeError
from cai.server_process import ServerProcess
from judge_server import protocol as P

if TYPE_CHECKING:  # the client side imports only the protocol at run time (tests/test_layers.py)
    from judge_server.settings import BackendSettings


class LocalJudge(ServerProcess):
    """Start the judge service (`python -m judge_server`, as `cai judge serve`) for a local model on loopback, wait until it answers, stop it on exit.

        with LocalJudge("smollm2-135m-instruct", "harmless-helpful") as judge:
            async with JudgeClient(judge.url) as client: ...
    """

    what = "judge server"
    error = JudgeError

    def __init__(self, model: str, constitution: str | Path, *, port: int | None = None, log_path: str | Path | None = None,
                 start_timeout: float = 600.0, extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 backends: BackendSettings | None = None):
        super().__init__(port=port, log_path=log_path, start_timeout=start_timeout, log_prefix="cai-judge-")
        self.model, self.constitution = model, str(constitution)
        self.backends = backends
        self.extra_args = list(extra_args)
        self.env = env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "judge_server", "--model", self.model, "--constitution", self.constitution,
                "--port", str(self.port), *(self.backends.command_line() if self.backends else []), *self.extra_args]

    def environment(self) -> dict[str, str]:
        return {**(os.environ if self.env is None else self.env), P.PARENT_PID_ENV: str(os.getpid())}  # it stops when we are gone


@contextmanager
def judge_endpoint(url: str | None, *, model: str, constitution: str | Path, log_path: str | Path | None = None,
                   backends: BackendSettings | None = None) -> Iterator[str]:
    """The URL of a judge to use: `url` as given, or a `LocalJudge` started for `model` (or on `backends`), stopped on exit."""
    if url:
        yield url.rstrip("/")
        return
    with LocalJudge(model, constitution, log_path=log_path, backends=backends) as judge:
        yield judge.url
