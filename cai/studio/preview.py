"""The data a constitution would make: a few prompts through `cai generate sft`'s critique -> revision, in the studio.

The rows are made by the generator's own functions (`cai.generate.sft`: `first_answers`, `new_rows`,
`critique_revise`, `is_sft_target`; the revision guard of `cai.generate.revision_guard`), under the
version in service, so the page shows the row `cai generate sft` writes for the same prompt, seed and
constitution, or that it drops it and why, with every critique, revision and guard verdict on the way.

The first answer is the policy's, drawn as `cai generate sft` draws it: the studio has only a judge, so
its model is the policy (as in the demo config, where one model is policy and judge), loaded here once,
by default with transformers (about a second to start, where vLLM takes 30 to 40 s; vLLM's samples
differ from transformers' under the same seed, so the page prints the command that makes the same rows).
That is what an author asks of this panel: what would the pipeline write. An answer pasted for a
prompt replaces the policy's, to see how the constitution treats an answer the small policy would not give.

Bounded: at most MAX_PROMPTS prompts and MAX_ROUNDS rounds, tokens capped by the studio's max_tokens; one
run at a time, in the background, with its progress in the page. What the models write (empty, looping,
garbage) is what the guard judges and the page shows; a judge error fails its row, as in the generator.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cai.constitution import Constitution
from cai.generate.revision_pairs import revision_pairs
from cai.generate.sft import SftJob, critique_revise, first_answers, is_sft_target, new_rows
from cai.judge import Judge
from cai.policy import load_policy
from cai.prompts import Prompt, load_prompts
from cai.samples import Sample, SamplingConfig
from cai.studio.judging import StudioJudge
from cai.studio.settings import StudioSettings
from cai.studio.state import ConstitutionFile

logger = logging.getLogger(__name__)

MAX_PROMPTS = 5
"""Prompts one preview may take: each costs a policy answer and two judge generations per round on a CPU."""
MAX_ROUNDS = 3
TYPED_SOURCE = "studio"
"""The source (and id prefix) of prompts typed in the page."""

PromptText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000)]
AnswerText = Annotated[str, StringConstraints(max_length=8000)]


class PreviewRequest(BaseModel):
    """What the page asks: typed prompts (or `count` of the shipped ones, seeded as `cai generate sft --limit` takes them),
    answers pasted for some of them, the seed and the rounds."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[PromptText] = Field(default_factory=list, max_length=MAX_PROMPTS, description="Typed prompts; none: "
                                      "`count` from the studio's --preview-prompts.")
    answers: list[AnswerText] = Field(default_factory=list, max_length=MAX_PROMPTS, description="A pasted first answer per "
                                      "prompt, by position; empty: the policy's.")
    count: int = Field(default=3, ge=1, le=MAX_PROMPTS)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    rounds: int = Field(default=SftJob.model_fields["rounds"].default, ge=1, le=MAX_ROUNDS)

    @model_validator(mode="after")
    def _answers_fit(self) -> PreviewRequest:
        n = len(self.prompts) or self.count
        if len(self.answers) > n:
            raise ValueError(f"{len(self.answers)} answers for {n} prompts: paste at most one answer per prompt")
        return self


@dataclass
class PreviewState:
    """The one preview run: its progress, and its rows once done."""

    state: str = "idle"
    phase: str = ""
    done: int = 0
    total: int = 0
    error: str | None = None
    version: str | None = None
    command: str | None = None
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _CountingJudge(Judge):
    """The generator's judge, moving the page's progress after each batch of critiques or revisions."""

    def __init__(self, judge: StudioJudge, constitution: Constitution, state: PreviewState):
        super().__init__(judge.client, judge.cache, judge.model, constitution.hash)
        self.state = state

    async def critique_many(self, reqs):
        self.state.phase = f"critiques of {len(reqs)} answer(s)"
        out = await super().critique_many(reqs)
        self.state.done += len(reqs)
        return out

    async def revise_many(self, reqs):
        self.state.phase = f"revisions of {len(reqs)} answer(s)"
        out = await super().revise_many(reqs)
        self.state.done += len(reqs)
        return out


def outcome(row: dict) -> str:
    """What `cai generate sft` does with the row, in words."""
    if row["status"] != "ok":
        return f"dropped: the judge failed ({row['error']}); logged as failed in progress.jsonl and asked again on a rerun"
    if is_sft_target(row):
        return "written to sft.jsonl: the final revision is the SFT target"
    if not (row["initial_response"] or "").strip():
        return "dropped from sft.jsonl: no revision was kept and the first answer is empty (kept in progress.jsonl only)"
    return ("dropped from sft.jsonl: the guard rejected every revision (kept in progress.jsonl; --keep-unrevised would train "
            "on the first answer)")


def shown(row: dict, pasted: bool) -> dict:
    """A finished row as the page shows it: the row itself (what the generator logs), where its answer came from, each
    step's guard verdict and what is written."""
    steps = [{**t, "verdict": "kept" if not t["rejected"] else f"rejected: {t['rejected']}"} for t in row["trajectory"]]
    return {"row": row, "answer_from": "pasted" if pasted else "policy", "steps": steps, "written": row["status"] == "ok"
            and is_sft_target(row), "outcome": outcome(row), "revision_pair": bool(revision_pairs([row]))}


class Preview:
    """The preview runs of one studio: the policy (loaded on the first run, kept), and the run under way or last done."""

    def __init__(self, settings: StudioSettings, judge: StudioJudge):
        self.settings, self.judge = settings, judge
        self.state = PreviewState()
        self.task: asyncio.Task | None = None
        self._policy = None

    @property
    def policy_name(self) -> str:
        return self.settings.preview_policy or self.judge.model

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def job(self, body: PreviewRequest, file: ConstitutionFile) -> SftJob:
        """The `cai generate sft` job whose rows the preview makes (its outputs are never written)."""
        cap = self.settings.max_tokens
        defaults = SftJob.model_fields
        return SftJob(prompts=self.settings.preview_prompts, out="runs/sft-data", limit=body.count, seed=body.seed,
                      rounds=body.rounds, policy=self.policy_name, policy_backend=self.settings.preview_backend,
                      constitution=str(file.path), judge_url=self.judge.client.base_url,
                      sampling=SamplingConfig(max_new_tokens=min(SamplingConfig.model_fields["max_new_tokens"].default, cap)),
                      critique_tokens=min(defaults["critique_tokens"].default, cap),
                      revision_tokens=min(defaults["revision_tokens"].default, cap))

    def start(self, body: PreviewRequest, file: ConstitutionFile) -> None:
        """Run the preview in the background under the version in service (the caller checks that none is running)."""
        self.state = PreviewState("running", phase="starting", version=file.in_service.hash)
        self.task = asyncio.create_task(self._run(body, file, self.state))

    async def _run(self, body: PreviewRequest, file: ConstitutionFile, state: PreviewState) -> None:
        try:
            await self._make(body, file, state)
            state.state, state.phase = "done", ""
        except Exception as e:  # a background job: whatever stops it is shown in the page, never lost
            logger.exception("studio preview failed")
            state.state, state.error = "error", f"{type(e).__name__}: {e}"

    async def _make(self, body: PreviewRequest, file: ConstitutionFile, state: PreviewState) -> None:
        constitution = file.in_service
        job = self.job(body, file)
        if body.prompts:
            prompts = [Prompt.from_text(text, TYPED_SOURCE) for text in body.prompts]
        else:
            state.phase = f"loading {job.prompts}"
            prompts = await asyncio.to_thread(load_prompts, job.prompts, limit=job.limit, seed=job.seed, shuffle=True)
            state.command = sft_command(job)
        pasted = [i < len(body.answers) and bool(body.answers[i].strip()) for i in range(len(prompts))]
        state.total = sum(not p for p in pasted) + 2 * job.rounds * len(prompts)
        answers: list[Sample | None] = [Sample(body.answers[i], "pasted", 0) if p else None for i, p in enumerate(pasted)]
        todo = [p for p, a in zip(prompts, answers) if a is None]
        if todo:
            state.phase = (f"loading the policy {job.policy}, then " if self._policy is None else "") + f"{len(todo)} policy answer(s)"
            drawn = iter(await asyncio.to_thread(self._answers, job, todo))
            answers = [a if a is not None else next(drawn) for a in answers]
            state.done += len(todo)
        judge = _CountingJudge(self.judge, constitution, state)
        rows = new_rows(job, constitution, judge, prompts, answers)
        await critique_revise(job, constitution, judge, rows)
        state.rows = [shown(r, p) for r, p in zip(rows, pasted)]

    def _answers(self, job: SftJob, prompts: list[Prompt]) -> list[Sample]:
        """The policy's first answers (in a worker thread: loading and sampling block)."""
        if self._policy is None:
            self._policy = load_policy(job.policy, backend=job.policy_backend, batch_size=MAX_PROMPTS)
        return first_answers(self._policy, job, prompts)

    def report(self) -> dict:
        return {**self.state.as_dict(), "prompts": self.settings.preview_prompts, "policy": self.policy_name,
                "backend": self.settings.preview_backend, "max_prompts": MAX_PROMPTS, "max_rounds": MAX_ROUNDS,
                "max_tokens": self.settings.max_tokens}

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self._policy is not None:
            self._policy.close()


def sft_command(job: SftJob) -> str:
    """The `cai generate sft` command that writes these rows (the same prompts, seed, sizes and policy sampling)."""
    args = {"--prompts": job.prompts, "--limit": job.limit, "--seed": job.seed, "--rounds": job.rounds,
            "--max-new-tokens": job.sampling.max_new_tokens, "--critique-tokens": job.critique_tokens,
            "--revision-tokens": job.revision_tokens, "--policy": job.policy, "--policy-backend": job.policy_backend,
            "--constitution": job.constitution, "--judge-url": job.judge_url, "--out": job.out}
    return "cai generate sft " + " ".join(f"{k} {shlex.quote(str(v))}" for k, v in args.items())
