"""What `cai generate sft` and `cai generate prefs` share: the judge (cached), progress, outputs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cai import __version__
from cai.constitution import Constitution
from cai.judge_cache import JudgeCache
from cai.judge_client import JudgeClient, JudgeError, JudgeItemError
from cai.rowlog import RowLog
from judge_server import protocol as P

logger = logging.getLogger(__name__)


class ConstitutionMismatchError(ValueError):
    """The judge serves another constitution than the one the job was given."""


@dataclass
class Timers:
    """Wall time per phase, for the share of time in policy generation vs judging."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


class CachedJudge:
    """The judge client behind a content-addressed cache, pinned to one constitution version.

    Batch calls return, in place, a result or the `JudgeError` that item met, so one failure is
    recorded in its row and the rest go on.
    """

    def __init__(self, client: JudgeClient, cache: JudgeCache | None, model: str, constitution_hash: str):
        self.client, self.cache, self.model, self.constitution_hash = client, cache, model, constitution_hash

    @classmethod
    async def connect(cls, client: JudgeClient, cache: JudgeCache | None, constitution: Constitution) -> CachedJudge:
        served = await client.constitution()
        if served.hash != constitution.hash:
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


def describe_error(err: JudgeError) -> str:
    return f"{err.kind}: {err.message}" if isinstance(err, JudgeItemError) else str(err)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


def provenance(constitution: Constitution, judge: CachedJudge, **extra) -> dict:
    return {"constitution_name": constitution.name, "constitution_hash": constitution.hash, "judge_model": judge.model,
            "cai_version": __version__, **extra}


def write_outputs(log: RowLog, out: Path, name: str) -> tuple[Path, int]:
    """The finished rows (status ok, one per id) as OUT/NAME.jsonl and a `datasets` folder OUT/dataset."""
    from datasets import Dataset

    rows = [r for r in log.final_rows() if r.get("status") == "ok"]
    path = out / f"{name}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    if rows:
        Dataset.from_list(rows).save_to_disk(str(out / "dataset"))
    return path, len(rows)
