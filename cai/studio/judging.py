"""What the studio asks the judge: "try it" on one prompt, and the constitution against people's labels.

Every request is pinned to the version in service (its hash), and cached by what its answer depends
on: a comparison under one principle by that principle's text only, a critique or revision by its
principle and the constitution's few-shot examples. So after an edit of one principle only that
principle's requests are asked again; the rest are answered from the judge cache
(`cai.judge_cache`). The figures are `cai judge eval`'s (`cai.judge_eval`), every pair judged under
every principle, with the change against the version measured before and the pairs whose label flipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cai.constitution import Constitution, Principle
from cai.errors import CaiError
from cai.judge import Judge, first_error
from cai.judge_cache import JudgeCache
from cai.judge_client import JudgeClient
from cai.judge_eval import agreement_change, compare_requests, figures, judged_rows
from cai.studio.state import ConstitutionFile
from judge_server import protocol as P

logger = logging.getLogger(__name__)

CHUNK = 16
"""Comparisons sent per batch; the progress moves after each."""


def _scope(principle: Principle, constitution: Constitution | None) -> str:
    """The cache scope of a request under `principle`: its text, and the few-shot examples when they are in the prompt."""
    content = principle.model_dump_json() + (constitution.model_dump_json(include={"examples"}) if constitution else "")
    return "principle:" + hashlib.sha256(content.encode("utf-8")).hexdigest()


@dataclass
class Progress:
    """How far the against-people run is: requests answered of all it needs, and how many came from the cache."""

    state: str = "idle"
    done: int = 0
    total: int = 0
    hits: int = 0
    misses: int = 0
    version: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class StudioJudge:
    """The judge client and answer cache, asked per principle so that an edit re-asks only what it changed."""

    def __init__(self, client: JudgeClient, cache: JudgeCache, model: str, max_tokens: int):
        self.client, self.cache, self.model, self.max_tokens = client, cache, model, max_tokens

    async def _ask(self, endpoint: str, constitution: Constitution, reqs: Sequence[P.BaseModel], scopes: Sequence[str],
                   result_type: type, on_progress: Callable[[int, int], None] | None = None, *,
                   errors_in_place: bool = False) -> list:
        """The judge's answers to `reqs` (from the cache where it has them). A request's JudgeError is raised, or with
        `errors_in_place` returned in its place (and not cached) so the other answers still count."""
        keys = [JudgeCache.key(endpoint, self.model, scope, req) for req, scope in zip(reqs, scopes)]
        out: list = [self.cache.get(k, result_type) for k in keys]
        todo = [i for i, r in enumerate(out) if r is None]
        if on_progress:
            on_progress(len(reqs) - len(todo), 0)
        judge = Judge(self.client, None, self.model, constitution.hash)
        ask = getattr(judge, f"{endpoint}_many")
        for start in range(0, len(todo), CHUNK):
            part = todo[start:start + CHUNK]
            fresh = await ask([reqs[i] for i in part])
            if not errors_in_place:
                first_error(fresh)
            for i, r in zip(part, fresh):
                out[i] = r
                if isinstance(r, result_type):
                    self.cache.put(keys[i], r)
            if on_progress:
                on_progress(0, len(part))
        return out

    async def try_it(self, constitution: Constitution, prompt: str, answers: list[str], principle_id: str) -> dict:
        """Critique and revision of each answer under one principle; with two answers, the label under every principle."""
        principle = constitution.principle(principle_id)
        scope = _scope(principle, constitution)
        generation = P.GenerationOptions(max_tokens=self.max_tokens)
        critiques = await self._ask("critique", constitution, [
            P.CritiqueRequest(prompt=prompt, response=P.or_placeholder(a), principle_id=principle.id, generation=generation)
            for a in answers], [scope] * len(answers), P.CritiqueResult)
        revisions = await self._ask("revise", constitution, [
            P.ReviseRequest(prompt=prompt, response=P.or_placeholder(a), critique=c.critique, principle_id=principle.id,
                            generation=generation) for a, c in zip(answers, critiques)], [scope] * len(answers), P.ReviseResult)
        labels = []
        if len(answers) == 2:
            reqs = [P.CompareRequest(prompt=prompt, response_a=P.or_placeholder(answers[0]), response_b=P.or_placeholder(answers[1]),
                                     principle_ids=[p.id]) for p in constitution.principles]
            results = await self._ask("compare", constitution, reqs, [_scope(p, None) for p in constitution.principles],
                                      P.CompareResult)
            labels = [{"principle_id": r.principle_ids[0], "p_a": r.p_a, "p_a_shown_first": r.p_a_shown_first,
                       "p_a_shown_second": r.p_a_shown_second, "same_position": r.same_position, "option_mass": r.option_mass}
                      for r in results]
        return {"constitution_hash": constitution.hash, "principle_id": principle.id,
                "answers": [{"critique": c.critique, "revision": r.revision} for c, r in zip(critiques, revisions)],
                "labels": labels}

    async def measure(self, constitution: Constitution, pairs: list[dict], chosen_first: list[bool], seed: int,
                      on_progress: Callable[[int, int], None]) -> list[dict]:
        """`cai judge eval`'s rows for the pairs, every pair judged under every principle."""
        principles = {p.id: p for p in constitution.principles}
        reqs = compare_requests(pairs, chosen_first, list(principles), seed)
        scopes = [_scope(principles[r.principle_ids[0]], None) for r in reqs]
        results = await self._ask("compare", constitution, reqs, scopes, P.CompareResult, on_progress)
        return judged_rows(constitution.name, constitution, pairs, chosen_first, results)


def flipped_pairs(pairs: list[dict], before: list[dict], after: list[dict]) -> list[dict]:
    """The pairs on which the judge's agreement with people changed between two measured versions, to read."""
    return [{"pair": i, "prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
             "people_p_chosen": pair.get("p_chosen", 1.0), "judge_before": b["p_chosen"], "judge_after": a["p_chosen"],
             "agree_before": b["agree"], "agree_after": a["agree"]}
            for i, (pair, b, a) in enumerate(zip(pairs, before, after)) if b["agree"] != a["agree"]]


@dataclass
class PeopleBench:
    """The labelled pairs and the one against-people run at a time: its progress, the version measured last and the one
    before it (the change the page shows)."""

    pairs: list[dict]
    chosen_first: list[bool]
    seed: int
    progress: Progress = field(default_factory=Progress)
    last: str | None = None
    previous: str | None = None
    task: asyncio.Task | None = None
    again: bool = False

    def advance(self, cached: int, asked: int) -> None:
        self.progress.done += cached + asked
        self.progress.hits += cached
        self.progress.misses += asked

    def start(self, judge: StudioJudge, file: ConstitutionFile) -> None:
        """Measure the version in service in the background; asked while a run is under way, once more after it."""
        if self.task is not None and not self.task.done():
            self.again = True
            return
        self.task = asyncio.create_task(self._run(judge, file))

    async def _run(self, judge: StudioJudge, file: ConstitutionFile) -> None:
        self.again = True
        while self.again:
            self.again = False
            constitution = file.in_service
            version = file.versions[constitution.hash]
            self.progress = Progress("done", version=constitution.hash)  # measured before: nothing to ask
            if version.rows is None:
                self.progress = Progress("running", total=len(self.pairs) * len(constitution.principles),
                                         version=constitution.hash)
                try:
                    rows = await judge.measure(constitution, self.pairs, self.chosen_first, self.seed, self.advance)
                except CaiError as e:
                    self.progress.state, self.progress.error = "error", str(e)
                    logger.error("against-people run of %s failed: %s", constitution.short_hash, e)
                    return
                version.rows, version.figures = rows, figures(rows, self.seed)
                self.progress.state = "done"
            if constitution.hash != self.last:
                self.previous, self.last = self.last, constitution.hash

    def report(self, file: ConstitutionFile) -> dict:
        """The run's progress, the figures of the version measured last, and its change against the one before."""
        out: dict = {"progress": self.progress.as_dict(), "n_pairs": len(self.pairs), "current": None, "change": None}
        if self.last is not None:
            out["current"] = {"hash": self.last, "figures": file.versions[self.last].figures}
        if self.previous is not None:
            out["change"] = self.compare(file, self.previous, self.last)
        return out

    def compare(self, file: ConstitutionFile, before: str, after: str) -> dict:
        """Two measured versions: the paired agreement change, and the pairs whose label flipped."""
        was, now = file.versions[before].rows, file.versions[after].rows
        change = agreement_change(was, now, self.seed)
        return {"from": before, "to": after, "agreement_change": {**change.as_dict(), "moved": change.moved},
                "flipped": flipped_pairs(self.pairs, was, now)}
