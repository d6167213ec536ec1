"""The one connection to a judge that every stage uses: the generators, PPO, `cai eval` and the demo.

`Judge.connect(client, cache, constitution)` checks that the server serves the constitution the job
was given (its hash) and pins every request to it; batch calls go through the content-addressed
cache (`cai.judge_cache`), when one is given, and `JudgeClient`'s bounded concurrency and retries,
and return, in place, a result or the `JudgeError` that item met. `SyncJudge` is the same connection
for code that is not async (PPO's scorers): one client and event loop on a thread for the whole run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from cai.constitution import Constitution
from cai.errors import CaiError
from cai.judge_cache import JudgeCache
from cai.judge_client import JudgeClient, JudgeError
from judge_server import protocol as P


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


def first_error(results: Sequence) -> None:
    """Raise the first JudgeError among batch results (for callers that cannot go on without every answer)."""
    for r in results:
        if isinstance(r, JudgeError):
            raise r


class SyncJudge:
    """A synchronous face of `Judge` for code that is not async (PPO's judge reward and gold score): one client and
    one event loop, on a background thread, for the whole run, instead of a new client per call."""

    def __init__(self, url: str, *, api_key: str | None = None, constitution: Constitution | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cai-judge", daemon=True)
        self._thread.start()
        self.url = url

        async def connect() -> Judge:
            return await Judge.connect(JudgeClient(url, api_key=api_key), None, constitution)

        try:
            self.judge = self._run(connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score_many(self, reqs: Sequence[P.ScoreRequest]) -> list[P.ScoreResult | JudgeError]:
        return self._run(self.judge.score_many(reqs))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self.judge.client.aclose())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
