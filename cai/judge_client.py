"""Client for the judge service: async httpx, bounded concurrency, bounded retries with jitter.

    async with JudgeClient("http://127.0.0.1:8321") as judge:
        label = await judge.compare(CompareRequest(prompt=q, response_a=a, response_b=b))

Retries happen only here, at the network boundary: transport errors, 429 (queue full) and
502/503/504, up to `max_retries` with exponential back-off and jitter. Other errors raise
`JudgeHTTPError` at once with the server's typed message. Starting a judge of our own
(`LocalJudge`) is `cai.judge_launcher`'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import TypeVar

import httpx
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from cai.errors import CaiError
from judge_server import protocol as P

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


JUDGE_RETRIES = 6
"""Tries per judge call on transport errors and retryable statuses, unless the job's settings say otherwise."""


class JudgeClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, concurrency: int = 16, timeout: float = 300.0,
                 max_retries: int = JUDGE_RETRIES, max_wait: float = 20.0):
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

    async def propose_many(self, reqs: Sequence[P.ProposeRequest], batch_size: int = 8,
                           raise_on_error: bool = True) -> list[P.ProposeResult | JudgeItemError]:
        """Principles proposed for pairs people labelled (Inverse Constitutional AI), in batches of `batch_size`."""
        return await self._batched("/v1/propose/batch", P.ProposeBatch, P.ProposeBatchResult, reqs, batch_size, raise_on_error)


def _http_error(resp: httpx.Response, path: str) -> JudgeHTTPError:
    try:
        err = P.ErrorResponse.model_validate(resp.json()).error
        return JudgeHTTPError(resp.status_code, err.type, err.message, err.field, path)
    except ValueError:
        return JudgeHTTPError(resp.status_code, "http_error", resp.text[:200], None, path)
