"""`cai generate prefs`: AI-labelled preference pairs for reward models and DPO.

For each prompt the policy samples K responses; every pair of distinct responses is compared by
the judge in both orders (soft label); the row holds `prompt, chosen, rejected` as TRL expects,
plus `p_chosen`, each order's probability, the principles used and the provenance. Rows are
appended as they finish; rerunning the same command resumes. The summary shows what a biased
judge would leave behind: label entropy, position consistency, chosen vs rejected length.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
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


@dataclass
class PrefsJob:
    """Settings of one `cai generate prefs` run (pinned in OUT/run.json)."""

    prompts: str
    """Prompt source spec (see `cai prompts list`)."""
    out: Path
    """Output folder: progress.jsonl, prefs.jsonl, dataset/, summary.json."""
    policy: str = "smollm2-135m-instruct"
    constitution: str = "harmless-helpful"
    judge_url: str | None = None
    judge_model: str | None = None
    samples: int = 2
    """K responses per prompt; every distinct pair is labelled."""
    n_principles: int = 1
    """Principles ensembled per comparison (sampled per pair, seeded)."""
    cot: bool = False
    """Chain-of-thought comparisons (labels clamped to [0.4, 0.6])."""
    limit: int | None = None
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    chunk_size: int = 8
    """Prompts per policy batch (rows are written per chunk)."""
    policy_backend: str = "auto"
    """vllm, transformers, or auto (vLLM when installed: faster here, see benchmarks/policy_generation.py)."""
    judge_cache: Path | None = None

    def pinned(self) -> dict:
        d = asdict(self)
        for transient in ("out", "judge_url", "judge_cache", "chunk_size", "policy_backend"):
            d.pop(transient)
        return d


def generate_prefs(job: PrefsJob) -> dict:
    if job.samples < 2:
        raise ValueError(f"samples must be >= 2 to make pairs, got {job.samples}")
    constitution_path = find_constitution(job.constitution)
    constitution = load_constitution(constitution_path)
    prompts = load_prompts(job.prompts, limit=job.limit, seed=job.seed, shuffle=True)
    pin_run(job.out, {**job.pinned(), "constitution_hash": constitution.hash})
    timers = Timers()
    with RowLog.open(job.out / "progress.jsonl") as log:
        # A prompt is done when a row exists for it (pairs of a prompt are written together).
        done_prompts = {r["prompt_id"] for r in log.final_rows() if r.get("status") in ("ok", "no_pair")} - {
            r["prompt_id"] for r in log.final_rows() if r.get("status") == "judge_failed"}
        todo = [p for p in prompts if p.id not in done_prompts]
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
        path, n_ok = write_outputs(log, job.out, "prefs")
        summary = summarise([r for r in log.final_rows() if r.get("status") == "ok"], log.final_rows())
    summary.update(output=str(path), prompts=len(prompts), failed_this_run=failures,
                   seconds={k: round(v, 1) for k, v in timers.seconds.items()})
    (job.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


async def _run(job: PrefsJob, constitution, todo, policy, url: str, log: RowLog, timers: Timers) -> int:
    cache = JudgeCache(job.judge_cache or cache_dir() / "judge-cache.sqlite")
    failures = 0
    async with JudgeClient(url) as client:
        judge = await CachedJudge.connect(client, cache, constitution)
        with progress_bar() as bar:
            task = bar.add_task("prompts", total=len(todo), rate="")
            for start in range(0, len(todo), job.chunk_size):
                chunk = todo[start:start + job.chunk_size]
                with timers.phase("policy"):
                    samples = policy.sample([p.text for p in chunk], n=job.samples, config=job.sampling, seed=f"{job.seed}:prefs")
                pairs, empty = [], []
                for prompt, group in zip(chunk, samples):
                    distinct = list(dict.fromkeys(s.text for s in group if s.text))
                    found = list(itertools.combinations(range(len(distinct)), 2))
                    if not found:
                        empty.append(prompt)
                    pairs += [(prompt, i, j, distinct[i], distinct[j]) for i, j in found]
                with timers.phase("judge"):
                    labels = await judge.compare_many([
                        P.CompareRequest(prompt=prompt.text, response_a=a, response_b=b, n_principles=job.n_principles, cot=job.cot,
                                         seed=job.seed) for prompt, _, _, a, b in pairs])
                for (prompt, i, j, a, b), label in zip(pairs, labels):
                    row = _row(job, prompt, i, j, a, b, label, judge, constitution)
                    failures += row["status"] != "ok"
                    log.append(row)
                for prompt in empty:  # all samples empty or identical: recorded, not silently dropped
                    log.append({"id": f"{prompt.id}:none", "prompt_id": prompt.id, "prompt": prompt.text, "status": "no_pair",
                                "error": "the policy's samples were empty or identical"})
                bar.update(task, advance=len(chunk), rate=f"{len(pairs)} pairs in last chunk")
    cache.close()
    return failures


def _row(job: PrefsJob, prompt, i, j, a, b, label, judge: CachedJudge, constitution) -> dict:
    row = {"id": f"{prompt.id}:{i}-{j}", "prompt_id": prompt.id, "prompt": prompt.text, "category": prompt.category,
           "provenance": provenance(constitution, judge, policy_model=job.policy, sampling=job.sampling.as_dict(), seed=job.seed,
                                    samples=job.samples, prompt_source=prompt.source)}
    if isinstance(label, JudgeError):
        return {**row, "status": "judge_failed", "error": describe_error(label), "chosen": None, "rejected": None}
    a_wins = label.p_a >= 0.5
    return {
        **row, "status": "ok", "error": None,
        "chosen": a if a_wins else b, "rejected": b if a_wins else a,
        "p_chosen": label.p_a if a_wins else 1.0 - label.p_a,
        # Each order's P(chosen better): where the chosen response was shown first, and second.
        "p_chosen_shown_first": label.p_a_shown_first if a_wins else 1.0 - label.p_a_shown_second,
        "p_chosen_shown_second": label.p_a_shown_second if a_wins else 1.0 - label.p_a_shown_first,
        "same_position": label.same_position, "principle_ids": label.principle_ids,
        "option_mass": sum(v.option_mass for v in label.votes) / len(label.votes),
    }


def summarise(ok: list[dict], all_rows: list[dict]) -> dict:
    """Dataset statistics that expose a biased judge (position, length) and uninformative labels."""
    def entropy(p: float) -> float:
        return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))

    n = len(ok)
    status = {}
    for r in all_rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    if not n:
        return {"pairs": 0, "status": status}
    len_c = [len(r["chosen"]) for r in ok]
    len_r = [len(r["rejected"]) for r in ok]
    return {
        "pairs": n,
        "status": status,
        "label_entropy_bits": round(sum(entropy(r["p_chosen"]) for r in ok) / n, 4),
        "mean_p_chosen": round(sum(r["p_chosen"] for r in ok) / n, 4),
        "position_consistency_rate": round(sum(not r["same_position"] for r in ok) / n, 4),
        "mean_chars_chosen": round(sum(len_c) / n, 1),
        "mean_chars_rejected": round(sum(len_r) / n, 1),
        "longer_is_chosen_rate": round(sum(c > r for c, r in zip(len_c, len_r)) / n, 4),
        "mean_option_mass": round(sum(r["option_mass"] for r in ok) / n, 4),
    }
