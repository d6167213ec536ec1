"""`cai generate sft`: critique -> revision trajectories, the supervised set of Constitutional AI.

For each prompt: (1) the policy answers; (2) for each of `rounds` rounds a principle is drawn
(seeded by run seed, prompt id and round), the judge critiques the current answer against it and
revises it; (3) the row keeps the whole trajectory and a `messages` column (user prompt, final
revision) that TRL-style SFT code reads as is. Rows are appended as they finish; rerunning the
same command resumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cai.constitution import find_constitution, load_constitution
from cai.generate.common import CachedJudge, Timers, describe_error, progress_bar, provenance, write_outputs
from cai.judge_cache import JudgeCache
from cai.judge_client import JudgeClient, JudgeError, judge_endpoint
from cai.models import cache_dir
from cai.policy import SamplingConfig, load_policy
from cai.prompts import load_prompts
from cai.rowlog import RowLog, pin_run
from judge_server import protocol as P

logger = logging.getLogger(__name__)
EMPTY = "(the assistant gave no response)"  # the judge API refuses empty text; say so explicitly


@dataclass
class SftJob:
    """Settings of one `cai generate sft` run (pinned in OUT/run.json)."""

    prompts: str
    """Prompt source spec (see `cai prompts list`)."""
    out: Path
    """Output folder: progress.jsonl, sft.jsonl, dataset/, summary.json."""
    policy: str = "smollm2-135m-instruct"
    """Model that writes the first answers."""
    constitution: str = "harmless-helpful"
    """Constitution file or shipped name."""
    judge_url: str | None = None
    """A running judge; None starts one for `judge_model`."""
    judge_model: str | None = None
    """Model for a judge started here (default: the policy)."""
    rounds: int = 2
    """Critique -> revision rounds per prompt."""
    limit: int | None = None
    """Use only the first N prompts (after the seeded shuffle)."""
    seed: int = 0
    """Seeds prompt order, principle draws and sampling."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Policy sampling for the first answer."""
    critique_tokens: int = 160
    revision_tokens: int = 192
    chunk_size: int = 8
    """Prompts per policy batch (rows are written per chunk)."""
    policy_backend: str = "auto"
    """vllm, transformers, or auto (vLLM when installed: faster here, see benchmarks/policy_generation.py)."""
    """Prompts per policy batch (rows are written per chunk)."""
    judge_cache: Path | None = None
    """SQLite cache of judge answers (default ~/.cache/cai/judge-cache.sqlite); reruns don't ask twice."""

    def pinned(self) -> dict:
        d = asdict(self)
        for transient in ("out", "judge_url", "judge_cache", "chunk_size", "policy_backend"):
            d.pop(transient)
        return d


def generate_sft(job: SftJob) -> dict:
    if job.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {job.rounds}")
    constitution_path = find_constitution(job.constitution)
    constitution = load_constitution(constitution_path)
    prompts = load_prompts(job.prompts, limit=job.limit, seed=job.seed, shuffle=True)
    pin_run(job.out, {**job.pinned(), "constitution_hash": constitution.hash})
    timers = Timers()
    with RowLog.open(job.out / "progress.jsonl") as log:
        todo = [p for p in prompts if p.id not in log.done_ids()]
        logger.info("%d prompts, %d already done, %d to go", len(prompts), len(prompts) - len(todo), len(todo))
        failures = 0
        if todo:
            policy = load_policy(job.policy, backend=job.policy_backend, batch_size=job.chunk_size)
            try:
                with judge_endpoint(job.judge_url, model=job.judge_model or job.policy, constitution=constitution_path,
                                    log_path=job.out / "judge.log") as url:
                    failures = asyncio.run(_run(job, constitution, todo, policy, url, log, timers))
            finally:
                policy.close()
        path, n_ok = write_outputs(log, job.out, "sft")
    summary = {"rows": n_ok, "prompts": len(prompts), "failed_this_run": failures, "output": str(path),
               "seconds": {k: round(v, 1) for k, v in timers.seconds.items()}}
    (job.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


async def _run(job: SftJob, constitution, todo, policy, url: str, log: RowLog, timers: Timers) -> int:
    cache = JudgeCache(job.judge_cache or cache_dir() / "judge-cache.sqlite")
    failures = 0
    async with JudgeClient(url) as client:
        judge = await CachedJudge.connect(client, cache, constitution)
        with progress_bar() as bar:
            task = bar.add_task("sft rows", total=len(todo), rate="")
            for start in range(0, len(todo), job.chunk_size):
                chunk = todo[start:start + job.chunk_size]
                with timers.phase("policy"):
                    answers = policy.sample([p.text for p in chunk], n=1, config=job.sampling, seed=f"{job.seed}:sft")
                rows = [_new_row(job, p, a[0], judge, constitution) for p, a in zip(chunk, answers)]
                with timers.phase("judge"):
                    await _critique_revise(job, constitution, rows, judge)
                for row in rows:
                    failures += row["status"] != "ok"
                    log.append(row)
                bar.update(task, advance=len(chunk), rate=f"{bar.tasks[task].speed * 60:.1f} rows/min" if bar.tasks[task].speed else "")
    cache.close()
    return failures


def _new_row(job: SftJob, prompt, sample, judge: CachedJudge, constitution) -> dict:
    return {
        "id": prompt.id, "prompt": prompt.text, "category": prompt.category, "initial_response": sample.text,
        "initial_finish_reason": sample.finish_reason, "trajectory": [], "messages": None, "status": "pending", "error": None,
        "provenance": provenance(constitution, judge, policy_model=job.policy, sampling=job.sampling.as_dict(), seed=job.seed,
                                 rounds=job.rounds, prompt_source=prompt.source),
    }


async def _critique_revise(job: SftJob, constitution, rows: list[dict], judge: CachedJudge) -> None:
    current = {id(r): r["initial_response"] or EMPTY for r in rows}
    live = list(rows)
    for rnd in range(job.rounds):
        principles = [constitution.sample_principles(1, seed=f"{job.seed}:{r['id']}:{rnd}")[0] for r in live]
        crits = await judge.critique_many([
            P.CritiqueRequest(prompt=r["prompt"], response=current[id(r)], principle_id=p.id, seed=job.seed,
                              generation=P.GenerationOptions(max_tokens=job.critique_tokens))
            for r, p in zip(live, principles)])
        live, principles, crits = _drop_failed(live, principles, crits, "critique", rnd)
        revs = await judge.revise_many([
            P.ReviseRequest(prompt=r["prompt"], response=current[id(r)], critique=c.critique, principle_id=p.id, seed=job.seed,
                            generation=P.GenerationOptions(max_tokens=job.revision_tokens))
            for r, p, c in zip(live, principles, crits)])
        live, principles, crits, revs = _drop_failed(live, principles, crits, "revision", rnd, revs)
        for r, p, c, v in zip(live, principles, crits, revs):
            r["trajectory"].append({"round": rnd, "principle_id": p.id, "critique": c.critique, "revision": v.revision})
            current[id(r)] = v.revision or current[id(r)]
    for r in live:
        r["messages"] = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": current[id(r)]}]
        r["final_response"] = current[id(r)]
        r["status"] = "ok"


def _drop_failed(live, principles, crits, what, rnd, revs=None):
    """Mark rows whose judge call failed (status, error) and keep the rest going."""
    answers = revs if revs is not None else crits
    keep = []
    for i, (r, a) in enumerate(zip(live, answers)):
        if isinstance(a, JudgeError):
            r["status"], r["error"] = "judge_failed", f"{what} in round {rnd}: {describe_error(a)}"
        else:
            keep.append(i)
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    out = [pick(live), pick(principles), pick(crits)]
    if revs is not None:
        out.append(pick(revs))
    return tuple(out)
