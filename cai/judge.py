"""The one connection to a judge that every stage uses: the generators, PPO, `cai eval`, `cai judge eval` and the demo.

`open_judge(settings, ...)` is how a job gets one: the judge at `judge_url` or one started here for a
model (`cai.judge_launcher`), a `JudgeClient` with the job's retries, the answer cache, and the
constitution pinned. `JudgeConnection` and `JudgeSettings` are the settings every judged job shares.
`Judge.connect(client, cache, constitution)` checks that the server serves the constitution the job
was given (its hash) and pins every request to it; batch calls go through the content-addressed
cache (`cai.judge_cache`), when one is given, and `JudgeClient`'s bounded concurrency and retries,
and return, in place, a result or the `JudgeError` that item met. `SyncJudge` is the same connection
for code that is not async (PPO's scorers): one client and event loop on a thread for the whole run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cai.constitution import DEFAULT_CONSTITUTION, Constitution
from cai.errors import CaiError
from cai.judge_cache import JudgeCache
from cai.judge_client import JUDGE_RETRIES, JudgeClient, JudgeError
from cai.judge_launcher import judge_endpoint
from cai.progress import progress_bar
from judge_server import protocol as P


class JudgeConnection(BaseModel):
    """Where a job's judge is and how hard to try reaching it: settings (and options) of every job that asks a judge."""

    model_config = ConfigDict(extra="forbid")

    judge_url: str | None = Field(default=None, description="A running judge server; none starts one for judge_model on loopback.")
    judge_model: str | None = Field(default=None, description="Model for a judge started here (default: the policy; in "
                                    "`cai eval`, the reference).")
    judge_retries: int = Field(default=JUDGE_RETRIES, ge=1, description="Tries per judge call on transport errors, 429 and 503 (back-off "
                               "with jitter); raise it to ride out a judge restart within one run.")


class JudgeSettings(JudgeConnection):
    """A judge connection and the one constitution the job judges by."""

    constitution: str = Field(default=DEFAULT_CONSTITUTION, description="Constitution file or shipped name; a judge given by URL "
                              "must serve the same one.")


class ConstitutionMismatchError(CaiError, ValueError):
    """The judge serves another constitution than the one the job was given."""


class Judge:
    """The judge client behind a content-addressed cache, pinned to one constitution version.

    Batch calls return, in place, a result or the `JudgeError` that item met, so one failure is
    recorded in its row and the rest go on.
    """

    def __init__(self, client: JudgeClient, cache: JudgeCache | None, model: str, constitution_hash: str):
        self.client, self.cache, self.model, self.constitution_hash = client, cache, model, constitution_hash

    @classmethod
    async def connect(cls, client: JudgeClient, cache: JudgeCache | None = None, constitution: Constitution | None = None) -> Judge:
        """Pinned to `constitution` (refused when the server serves another) or, with None, to the one it serves now:
        every request then names that hash, so an edit of the served file mid-run is refused (409), never mixed in."""
        served = await client.constitution()
        if constitution is not None and served.hash != constitution.hash:
            raise ConstitutionMismatchError(
                f"the judge at {client.base_url} serves constitution {served.name} ({served.hash[:12]}), but this job was given "
                f"{constitution.name} ({constitution.short_hash}); start the judge with the same file or pass the one it serves"
            )
        health = await client.health()
        return cls(client, cache, health.model, served.hash)

    async def _many(self, endpoint: str, send, reqs: Sequence[P.BaseModel], result_type) -> list:
        reqs = [r.model_copy(update={"constitution_hash": self.constitution_hash}) for r in reqs]
        keys = [JudgeCache.key(endpoint, self.model, self.constitution_hash, r) for r in reqs]
        out: list = [self.cache.get(k, result_type) if self.cache else None for k in keys]
        todo = [i for i, r in enumerate(out) if r is None]
        if todo:
            try:
                fresh = await send([reqs[i] for i in todo], raise_on_error=False)
            except JudgeError as e:  # unreachable or overloaded through every retry
                fresh = [e] * len(todo)
            for i, r in zip(todo, fresh):
                out[i] = r
                if self.cache is not None and not isinstance(r, JudgeError):
                    self.cache.put(keys[i], r)
        return out

    async def critique_many(self, reqs: Sequence[P.CritiqueRequest]) -> list[P.CritiqueResult | JudgeError]:
        return await self._many("critique", self.client.critique_many, reqs, P.CritiqueResult)

    async def revise_many(self, reqs: Sequence[P.ReviseRequest]) -> list[P.ReviseResult | JudgeError]:
        return await self._many("revise", self.client.revise_many, reqs, P.ReviseResult)

    async def compare_many(self, reqs: Sequence[P.CompareRequest]) -> list[P.CompareResult | JudgeError]:
        return await self._many("compare", self.client.compare_many, reqs, P.CompareResult)

    async def score_many(self, reqs: Sequence[P.ScoreRequest]) -> list[P.ScoreResult | JudgeError]:
        return await self._many("score", self.client.score_many, reqs, P.ScoreResult)

    async def propose_many(self, reqs: Sequence[P.ProposeRequest]) -> list[P.ProposeResult | JudgeError]:
        return await self._many("propose", self.client.propose_many, reqs, P.ProposeResult)


@asynccontextmanager
async def open_judge(conn: JudgeConnection, *, constitution: Constitution | None, constitution_path: str | Path | None = None,
                     default_model: str | None = None, cache: Path | None = None, log_path: Path | None = None,
                     api_key: str | None = None) -> AsyncIterator[Judge]:
    """A `Judge` connected and pinned to `constitution` (None: to the one the server serves now), caching its answers in
    the file `cache` when given.

    The judge is the one at `conn.judge_url` or, without a URL, one started here for `conn.judge_model` (else
    `default_model`) on `constitution_path`, its output in `log_path`, stopped on exit.
    """
    model = conn.judge_model or default_model
    if not conn.judge_url and (model is None or constitution_path is None):
        raise ValueError(f"open_judge: no judge_url, so a judge is started here, which needs a model (got {model!r}) and a "
                         f"constitution file (got {constitution_path!r})")
    cached = JudgeCache(cache) if cache is not None else None  # a bad cache path is refused before a judge starts
    try:
        # Starting a judge of our own blocks this loop until it answers; nothing else runs on it yet.
        with judge_endpoint(conn.judge_url, model=model, constitution=constitution_path, log_path=log_path) as url:
            async with JudgeClient(url, api_key=api_key, max_retries=conn.judge_retries) as client:
                yield await Judge.connect(client, cached, constitution)
    finally:
        if cached is not None:
            cached.close()


async def compare_all(judge: Judge, reqs: Sequence[P.CompareRequest], label: str, *, chunk: int = 32) -> list[P.CompareResult]:
    """Every comparison of `reqs` through `judge`, in chunks so the progress bar moves (the client batches each chunk);
    raises the first `JudgeError`, for figures that need every pair judged (a win rate, an agreement)."""
    results: list[P.CompareResult] = []
    with progress_bar("pairs") as bar:
        task = bar.add_task(label, total=len(reqs))
        for i in range(0, len(reqs), chunk):
            answers = await judge.compare_many(reqs[i:i + chunk])
            first_error(answers)
            results += answers
            bar.update(task, advance=len(answers))
    return results


def first_error(results: Sequence) -> None:
    """Raise the first JudgeError among batch results (for callers that cannot go on without every answer)."""
    for r in results:
        if isinstance(r, JudgeError):
            raise r


class SyncJudge:
    """A synchronous face of `Judge` for code that is not async (the RL trainers' judge rewards and gold score): one client and
    one event loop, on a background thread, for the whole run, instead of a new client per call."""

    def __init__(self, url: str, *, api_key: str | None = None, constitution: Constitution | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cai-judge", daemon=True)
        self._thread.start()
        self.url = url
        self._opened = AsyncExitStack()
        try:
            self.judge = self._run(self._opened.enter_async_context(
                open_judge(JudgeConnection(judge_url=url), constitution=constitution, api_key=api_key)))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score_many(self, reqs: Sequence[P.ScoreRequest]) -> list[P.ScoreResult | JudgeError]:
        return self._run(self.judge.score_many(reqs))

    def compare_many(self, reqs: Sequence[P.CompareRequest]) -> list[P.CompareResult | JudgeError]:
        return self._run(self.judge.compare_many(reqs))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._opened.aclose())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
