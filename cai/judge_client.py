"""Client for the judge service: async httpx, bounded concurrency, bounded retries with jitter.

    async with JudgeClient("http://127.0.0.1:8321") as judge:
        label = await judge.compare(CompareRequest(prompt=q, response_a=a, response_b=b))

Retries happen only here, at the network boundary: transport errors, 429 (queue full) and
502/503/504, up to `max_retries` with exponential back-off and jitter. Other errors raise
`JudgeHTTPError` at once with the server's typed message. `LocalJudge` starts a real server
process for a local model when no URL is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeVar

import httpx
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from cai.errors import CaiError
from judge_server import protocol as P

if TYPE_CHECKING:  # the client side imports only the protocol at run time (tests/test_layers.py)
    from judge_server.settings import BackendSettings

logger = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
RETRY_STATUSES = {429, 502, 503, 504}


class JudgeError(CaiError, RuntimeError):
    """Anything that went wrong talking to the judge."""


class JudgeHTTPError(JudgeError):
    def __init__(self, status: int, kind: str, message: str, field: str | None = None, path: str = ""):
        self.status, self.kind, self.message, self.field, self.path = status, kind, message, field, path
        super().__init__(f"judge {path} answered {status} {kind}: {message}")


class JudgeItemError(JudgeError):
    """One item of a batch that the judge refused on its own (the rest were judged)."""

    def __init__(self, index: int, kind: str, message: str, field: str | None = None):
        self.index, self.kind, self.message, self.field = index, kind, message, field
        super().__init__(f"item {index}: {kind}: {message}")


class JudgeUnavailableError(JudgeError):
    """The judge could not be reached, or stayed overloaded, through every retry."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, JudgeHTTPError) and exc.status in RETRY_STATUSES


class JudgeClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, concurrency: int = 16, timeout: float = 300.0,
                 max_retries: int = 6, max_wait: float = 20.0):
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(P.API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
                                       limits=httpx.Limits(max_connections=concurrency * 2))
        self._sem = asyncio.Semaphore(concurrency)
        self.max_retries = max_retries
        self.max_wait = max_wait

    async def __aenter__(self) -> JudgeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plumbing -------------------------------------------------------------------------
    async def _call(self, method: str, path: str, model: type[T], body: BaseModel | None = None) -> T:
        payload = body.model_dump(mode="json", exclude_defaults=True) if body is not None else None
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.max_retries),
                wait=wait_exponential_jitter(initial=0.5, max=self.max_wait),
                retry=retry_if_exception(_retryable),
                reraise=True,
            ):
                with attempt:
                    async with self._sem:
                        resp = await self._http.request(method, path, json=payload)
                    if resp.status_code >= 400:
                        raise _http_error(resp, path)
                    return model.model_validate(resp.json())
        except httpx.TransportError as e:
            raise JudgeUnavailableError(f"judge at {self.base_url} unreachable after {self.max_retries} tries: {e!r}") from e
        except JudgeHTTPError as e:
            if e.status in RETRY_STATUSES:
                raise JudgeUnavailableError(f"judge at {self.base_url} still answering {e.status} after {self.max_retries} tries: {e.message}") from e
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _batched(self, path: str, batch_model: type[BaseModel], result_model: type[BaseModel], items: Sequence[BaseModel],
                       batch_size: int, raise_on_error: bool) -> list:
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        answers = await asyncio.gather(*(self._call("POST", path, result_model, batch_model(items=list(c))) for c in chunks))
        out: list = []
        for r in (r for a in answers for r in a.results):
            if isinstance(r, P.ErrorResponse):
                r = JudgeItemError(len(out), r.error.type, r.error.message, r.error.field)
                if raise_on_error:
                    raise r
            out.append(r)
        return out

    # -- API ------------------------------------------------------------------------------
    async def health(self) -> P.Health:
        return await self._call("GET", "/health", P.Health)

    async def constitution(self) -> P.ConstitutionInfo:
        return await self._call("GET", "/v1/constitution", P.ConstitutionInfo)

    async def critique(self, req: P.CritiqueRequest) -> P.CritiqueResult:
        return await self._call("POST", "/v1/critique", P.CritiqueResult, req)

    async def revise(self, req: P.ReviseRequest) -> P.ReviseResult:
        return await self._call("POST", "/v1/revise", P.ReviseResult, req)

    async def compare(self, req: P.CompareRequest) -> P.CompareResult:
        return await self._call("POST", "/v1/compare", P.CompareResult, req)

    async def score(self, req: P.ScoreRequest) -> P.ScoreResult:
        return await self._call("POST", "/v1/score", P.ScoreResult, req)

    async def critique_many(self, reqs: Sequence[P.CritiqueRequest], batch_size: int = 16,
                          raise_on_error: bool = True) -> list[P.CritiqueResult | JudgeItemError]:
        """Judge in batches of `batch_size`; with raise_on_error=False a refused item is a JudgeItemError in its place."""
        return await self._batched("/v1/critique/batch", P.CritiqueBatch, P.CritiqueBatchResult, reqs, batch_size, raise_on_error)

    async def revise_many(self, reqs: Sequence[P.ReviseRequest], batch_size: int = 16,
                          raise_on_error: bool = True) -> list[P.ReviseResult | JudgeItemError]:
        """Judge in batches of `batch_size`; with raise_on_error=False a refused item is a JudgeItemError in its place."""
        return await self._batched("/v1/revise/batch", P.ReviseBatch, P.ReviseBatchResult, reqs, batch_size, raise_on_error)

    async def compare_many(self, reqs: Sequence[P.CompareRequest], batch_size: int = 32,
                          raise_on_error: bool = True) -> list[P.CompareResult | JudgeItemError]:
        """Judge in batches of `batch_size`; with raise_on_error=False a refused item is a JudgeItemError in its place."""
        return await self._batched("/v1/compare/batch", P.CompareBatch, P.CompareBatchResult, reqs, batch_size, raise_on_error)

    async def score_many(self, reqs: Sequence[P.ScoreRequest], batch_size: int = 32,
                          raise_on_error: bool = True) -> list[P.ScoreResult | JudgeItemError]:
        """Judge in batches of `batch_size`; with raise_on_error=False a refused item is a JudgeItemError in its place."""
        return await self._batched("/v1/score/batch", P.ScoreBatch, P.ScoreBatchResult, reqs, batch_size, raise_on_error)


def _http_error(resp: httpx.Response, path: str) -> JudgeHTTPError:
    try:
        err = P.ErrorResponse.model_validate(resp.json()).error
        return JudgeHTTPError(resp.status_code, err.type, err.message, err.field, path)
    except ValueError:
        return JudgeHTTPError(resp.status_code, "http_error", resp.text[:200], None, path)


# -- a server of our own ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in a child process of its own session on a loopback port: started, waited for until its /health answers
    200, stopped on exit. Subclasses give its `command()` and `environment()`; its output goes to `log_path`."""

    what = "server"  # how errors name it
    error: type[Exception] = JudgeError

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
                tail = self.log_path.read_text(errors="replace")[-3000:]
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


class LocalJudge(ServerProcess):
    """Start the judge service (`python -m judge_server`, as `cai judge serve`) for a local model on loopback, wait until it answers, stop it on exit.

        with LocalJudge("smollm2-135m-instruct", "harmless-helpful") as judge:
            async with JudgeClient(judge.url) as client: ...
    """

    what = "judge server"

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
