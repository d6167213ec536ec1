"""`cai generate sft`: critique -> revision trajectories, the supervised set of Constitutional AI.

For each prompt: (1) the policy answers; (2) for each of `rounds` rounds the judge server draws a
principle (seeded by the run seed and the text judged), critiques the current answer against it and
revises it; (3) the row keeps the whole trajectory and a `messages` column (user prompt, final
revision) that TRL-style SFT code reads as is. Rows are appended as they finish; rerunning the
same command resumes. A row whose every revision was rejected (see `rejected_revision`) stays in the
log but is not an SFT target (its target would be the policy's own first answer) unless
`keep_unrevised` says so; an empty first answer is never one. At the end the finished rows also
give preference pairs, final revision over first answer (`cai.generate.revision_pairs`):
OUT/revision_pairs.jsonl and OUT/revision-pairs/.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import Field

from cai.constitution import Constitution
from cai.generate.common import Chunk, GenerationJob, describe_error, provenance, run_generation, write_outputs, write_rows
from cai.generate.revision_guard import rejected_revision
from cai.generate.revision_pairs import revision_pair
from cai.judge import Judge
from cai.judge_client import JudgeError
from cai.prompts import Prompt
from cai.rowlog import RowLog
from cai.samples import Sample
from judge_server import protocol as P

logger = logging.getLogger(__name__)


class SftJob(GenerationJob):
    """Settings of one `cai generate sft` run."""

    rounds: int = Field(default=2, ge=1, description="Critique -> revision rounds per prompt.")
    critique_tokens: int = Field(default=160, ge=1, description="Longest critique, in tokens.")
    revision_tokens: int = Field(default=192, ge=1, description="Longest revision, in tokens.")
    keep_unrevised: bool = Field(default=False, description="Also train on rows whose every revision was rejected (their target "
                                 "is then the policy's own first answer); by default they stay in progress.jsonl only. "
                                 "An empty first answer is never a target.")

    TRANSIENT: ClassVar[tuple[str, ...]] = (*GenerationJob.TRANSIENT, "keep_unrevised")
    """keep_unrevised only selects which logged rows make the outputs, so a resumed run may change it."""


def generate_sft(job: SftJob) -> dict:
    summary, log = run_generation(job, "sft", pending=prompts_to_do, step=_step)
    return write_sft(job, log, summary)


def write_sft(job: SftJob, rows: Iterable[dict], summary: dict) -> dict:
    """From the log's rows (one per id; read twice, so a RowLog or a list, not a generator): OUT/sft.jsonl and OUT/dataset
    (the SFT targets), the revision pairs, and the summary with its figures, also in OUT/summary.json. Holds one row at a
    time. `cai generate merge` writes a sharded job's rows with it too."""
    if iter(rows) is rows:
        raise TypeError("write_sft reads the rows twice: pass a RowLog or a list, not an iterator")
    figures = _RevisionFigures()
    summary.update(write_outputs(rows, job.out, "sft", select=lambda r: is_sft_target(r, job.keep_unrevised), each=figures.add))
    steps = figures.steps
    rejected = sum(n for why, n in steps.items() if why)
    summary["revisions_rejected"] = {"total": rejected, "of": steps.total(), **{why: steps[why] for why in sorted(w for w in steps if w)}}
    summary["rows_revised"] = figures.revised
    summary["rows_dropped_unrevised"] = figures.finished - summary["rows"]
    if summary["rows_dropped_unrevised"]:
        logger.warning("sft: %d of %d finished rows were never revised and are not SFT targets (%s)",
                       summary["rows_dropped_unrevised"], figures.finished, "their first answer is empty" if job.keep_unrevised else "keep_unrevised keeps them")
    if steps and rejected > steps.total() / 2:
        logger.warning("sft: %d of %d revisions were rejected (%s): the judge model copies or repeats rather than revises; "
                       "a larger judge model (judge.model) gives real revisions", rejected, steps.total(),
                       ", ".join(k for k in summary["revisions_rejected"] if k not in ("total", "of")))
    # chosen = final revision, rejected = first answer: preferences the judge needn't compare
    pairs = (pair for row in rows if (pair := revision_pair(row)) is not None)
    summary["revision_pairs"] = write_rows(pairs, job.out / "revision_pairs.jsonl", job.out / "revision-pairs")
    (job.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@dataclass
class _RevisionFigures:
    """The summary's figures of sft rows, added up one row at a time."""

    steps: Counter = field(default_factory=Counter)
    """Every revision step of every row, by why it was rejected (None: accepted)."""
    finished: int = 0
    """Rows with status ok."""
    revised: int = 0
    """Finished rows with an accepted revision (rows logged before `revised` existed count as revised)."""

    def add(self, row: dict) -> None:
        self.steps.update(t.get("rejected") for t in row.get("trajectory") or [])
        if row.get("status") == "ok":
            self.finished += 1
            self.revised += bool(row.get("revised", True))


def is_sft_target(row: dict, keep_unrevised: bool = False) -> bool:
    """A finished row trains SFT when a revision of it was accepted, or (kept on request) when its first answer is not empty."""
    if row.get("revised", True):  # rows logged before `revised` existed count as revised, as they were trained on
        return True
    return keep_unrevised and bool((row.get("initial_response") or "").strip())


def prompts_to_do(log: RowLog, prompts: list[Prompt]) -> list[Prompt]:
    done = done_prompts(log)
    return [p for p in prompts if p.id not in done]


def done_prompts(rows: Iterable[dict]) -> set[str]:
    """The prompts whose row is finished (a row's id is its prompt's)."""
    return {r["id"] for r in rows if r.get("status") == "ok"}


async def _step(c: Chunk) -> int:
    job: SftJob = c.job
    with c.timers.phase("policy"):
        answers = first_answers(c.policy, job, c.prompts)
    rows = new_rows(job, c.constitution, c.judge, c.prompts, answers)
    for row, a in zip(rows, answers):  # a policy server's failure: logged as this row's, retried by a rerun
        if a.error is not None:
            row["status"], row["error"] = "policy_failed", a.error
    with c.timers.phase("judge"):
        await critique_revise(job, c.constitution, c.judge, [r for r in rows if r["status"] == "pending"])
    for row in rows:
        c.log.append(row)
    return sum(row["status"] != "ok" for row in rows)


def first_answers(policy, job: SftJob, prompts: list[Prompt]) -> list[Sample]:
    """The policy's first answer to each prompt, seeded by the run seed (a prompt's answer depends on nothing else)."""
    return [a[0] for a in policy.sample([p.text for p in prompts], n=1, config=job.sampling, seed=f"{job.seed}:sft")]


def new_rows(job: SftJob, constitution: Constitution, judge: Judge, prompts: list[Prompt], answers: list[Sample]) -> list[dict]:
    """One pending row per prompt, holding its first answer; `critique_revise` finishes them. The studio's preview
    (`cai.studio.preview`) makes its rows with these two, so it shows what this command writes."""
    return [{
        "id": p.id, "prompt": p.text, "category": p.category, "initial_response": a.text,
        "initial_finish_reason": a.finish_reason, "trajectory": [], "messages": None, "status": "pending", "error": None,
        "provenance": provenance(constitution, judge, policy_model=job.sampled_policy, sampling=job.sampling.as_dict(), seed=job.seed,
                                 rounds=job.rounds, prompt_source=p.source),
    } for p, a in zip(prompts, answers)]


async def critique_revise(job: SftJob, constitution: Constitution, judge: Judge, rows: list[dict]) -> None:
    """`job.rounds` rounds of critique -> revision on each row, the revision guard deciding whether a revision replaces
    the answer; each row ends "ok" with its trajectory and messages, or "judge_failed" with the error."""
    current = {r["id"]: P.or_placeholder(r["initial_response"]) for r in rows}
    live = list(rows)
    for rnd in range(job.rounds):
        # The server draws each critique's principle (by weight, seeded by the seed and the text judged), as it
        # does for comparisons and scores: one sampling scheme; the revision follows that principle.
        crits = await judge.critique_many([
            P.CritiqueRequest(prompt=r["prompt"], response=current[r["id"]], seed=job.seed,
                              generation=P.GenerationOptions(max_tokens=job.critique_tokens))
            for r in live])
        live, crits = _keep_answered(zip(live, crits), 2, f"critique in round {rnd}")
        revs = await judge.revise_many([
            P.ReviseRequest(prompt=r["prompt"], response=current[r["id"]], critique=cr.critique, principle_id=cr.principle_id,
                            seed=job.seed, generation=P.GenerationOptions(max_tokens=job.revision_tokens))
            for r, cr in zip(live, crits)])
        live, crits, revs = _keep_answered(zip(live, crits, revs), 3, f"revision in round {rnd}")
        for r, cr, v in zip(live, crits, revs):
            step = {"round": rnd, "principle_id": cr.principle_id, "critique": cr.critique, "revision": v.revision}
            step["rejected"] = rejected_revision(v.revision, answer=current[r["id"]], prompt=r["prompt"], critique=cr.critique,
                                                 constitution=constitution)
            r["trajectory"].append(step)
            if not step["rejected"]:
                current[r["id"]] = v.revision
    for r in live:
        r["revised"] = any(not t["rejected"] for t in r["trajectory"])
        # never revised: the first answer as it was, not the placeholder the judge was shown for an empty one
        r["final_response"] = current[r["id"]] if r["revised"] else r["initial_response"]
        r["messages"] = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["final_response"]}]
        r["status"] = "ok"


def _keep_answered(groups, width: int, what: str) -> tuple[list, ...]:
    """Mark each row whose judge answer (the last item of its group) is an error; keep the others going."""
    kept = []
    for group in groups:
        row, answer = group[0], group[-1]
        if isinstance(answer, JudgeError):
            row["status"], row["error"] = "judge_failed", f"{what}: {describe_error(answer)}"
        else:
            kept.append(group)
    return tuple(map(list, zip(*kept))) if kept else tuple([] for _ in range(width))
