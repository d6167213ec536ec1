"""`cai generate prefs`: AI-labelled preference pairs for reward models and DPO.

For each prompt the policy samples K responses; every pair of distinct responses is compared by
the judge in both orders (soft label); the row holds `prompt, chosen, rejected` as TRL expects,
plus `p_chosen`, each order's probability, the principles used and the provenance. Rows are
appended as they finish; rerunning the same command resumes. The summary shows what a biased
judge would leave behind: label entropy, position consistency, chosen vs rejected length.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import Field, field_validator

from cai.generate.common import Chunk, GenerationJob, describe_error, provenance, run_generation, write_outputs
from cai.judge_client import JudgeError
from cai.prompts import Prompt
from cai.rowlog import RowLog
from cai.samples import SamplingConfig
from judge_server import protocol as P

logger = logging.getLogger(__name__)


PREFS_TEMPERATURE = 1.0
"""The policy's default sampling temperature for pairs: diverse samples make informative pairs."""


class PrefsJob(GenerationJob):
    """Settings of one `cai generate prefs` run."""

    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=PREFS_TEMPERATURE),
                                     description="Policy sampling (diverse samples make informative pairs).")

    @field_validator("sampling", mode="before")
    @classmethod
    def _diverse_by_default(cls, given):
        """Sampling given in part (say only max_new_tokens) still samples at PREFS_TEMPERATURE unless it says otherwise."""
        return {"temperature": PREFS_TEMPERATURE, **given} if isinstance(given, dict) else given

    samples: int = Field(default=2, ge=2, description="K responses per prompt; every distinct pair is labelled.")
    n_principles: int = Field(default=1, ge=1, description="Principles ensembled per comparison (sampled per pair, seeded).")
    cot: bool = Field(default=False, description="Chain-of-thought comparisons (labels clamped to [0.4, 0.6]).")


def generate_prefs(job: PrefsJob) -> dict:
    summary, log = run_generation(job, "prefs", pending=prompts_to_do, step=_step)
    return write_prefs(job, log, summary)


def write_prefs(job: PrefsJob, rows: Iterable[dict], summary: dict) -> dict:
    """From the log's rows (one per id, read once, one at a time): OUT/prefs.jsonl and OUT/dataset (the labelled pairs)
    and the summary with its figures, also in OUT/summary.json. `cai generate merge` writes a sharded job's rows with it too."""
    figures = PairFigures()
    summary.update(write_outputs(rows, job.out, "prefs", each=figures.add))
    summary.update(figures.summary())
    (job.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def prompts_to_do(log: RowLog, prompts: list[Prompt]) -> list[Prompt]:
    done = done_prompts(log)
    return [p for p in prompts if p.id not in done]


def done_prompts(rows: Iterable[dict]) -> set[str]:
    """The prompts whose pair rows were all written (each row says how many) and none failed."""
    written: dict[str, list] = {}  # prompt id -> [rows seen, rows its first row says it has, none failed]
    for r in rows:
        seen = written.setdefault(r["prompt_id"], [0, r.get("pairs_for_prompt", 1), True])
        seen[0] += 1
        seen[2] = seen[2] and r["status"] in ("ok", "no_pair")
    return {pid for pid, (count, needed, finished) in written.items() if finished and count >= needed}


async def _step(c: Chunk) -> int:
    job: PrefsJob = c.job
    with c.timers.phase("policy"):
        samples = c.policy.sample([p.text for p in c.prompts], n=job.samples, config=job.sampling, seed=f"{job.seed}:prefs")
    pairs, failures = [], 0
    for prompt, group in zip(c.prompts, samples):
        failed = [s.error for s in group if s.error is not None]
        if failed:  # a policy server's failure: no pairs from part of the samples; the prompt stays to do, a rerun retries it
            logger.warning("prefs: prompt %s left for a rerun: %d of %d policy samples failed (%s)", prompt.id, len(failed),
                           len(group), failed[0])
            failures += 1
            continue
        distinct = list(dict.fromkeys(s.text for s in group if s.text))
        found = list(itertools.combinations(range(len(distinct)), 2))
        if not found:  # all samples empty or identical: recorded, not silently dropped
            c.log.append({"id": f"{prompt.id}:none", "prompt_id": prompt.id, "prompt": prompt.text, "status": "no_pair",
                          "error": "the policy's samples were empty or identical", "pairs_for_prompt": 1})
        pairs += [(prompt, i, j, distinct[i], distinct[j], len(found)) for i, j in found]
    with c.timers.phase("judge"):
        labels = await c.judge.compare_many([
            P.CompareRequest(prompt=prompt.text, response_a=a, response_b=b, n_principles=job.n_principles, cot=job.cot, seed=job.seed)
            for prompt, _, _, a, b, _ in pairs])
    for pair, label in zip(pairs, labels):
        row = _row(c, pair, label)
        failures += row["status"] != "ok"
        c.log.append(row)
    return failures


def _row(c: Chunk, pair: tuple, label) -> dict:
    job: PrefsJob = c.job
    prompt, i, j, a, b, n_pairs = pair
    row = {"id": f"{prompt.id}:{i}-{j}", "prompt_id": prompt.id, "prompt": prompt.text, "category": prompt.category,
           "pairs_for_prompt": n_pairs,
           "provenance": provenance(c.constitution, c.judge, policy_model=job.sampled_policy, sampling=job.sampling.as_dict(), seed=job.seed,
                                    samples=job.samples, n_principles=job.n_principles, cot=job.cot, prompt_source=prompt.source)}
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
        "option_mass": label.option_mass,
    }


def summarise(rows: Iterable[dict]) -> dict:
    """Dataset statistics that expose a biased judge (position, length) and uninformative labels, of the log's rows."""
    figures = PairFigures()
    for row in rows:
        figures.add(row)
    return figures.summary()


@dataclass
class PairFigures:
    """`summarise`'s sums, added up one row at a time (in the rows' order, so the figures are those of `sum` over a list)."""

    status: dict[str, int] = field(default_factory=dict)
    pairs: int = 0
    entropy_bits: float = 0
    p_chosen: float = 0
    position_consistent: int = 0
    chars_chosen: int = 0
    chars_rejected: int = 0
    longer_is_chosen: int = 0
    option_mass: float = 0

    def add(self, row: dict) -> None:
        self.status[row["status"]] = self.status.get(row["status"], 0) + 1
        if row.get("status") != "ok":
            return
        p = row["p_chosen"]
        self.pairs += 1
        self.entropy_bits += 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        self.p_chosen += p
        self.position_consistent += not row["same_position"]
        chosen, rejected = len(row["chosen"]), len(row["rejected"])
        self.chars_chosen += chosen
        self.chars_rejected += rejected
        self.longer_is_chosen += chosen > rejected
        self.option_mass += row["option_mass"]

    def summary(self) -> dict:
        n = self.pairs
        if not n:
            return {"pairs": 0, "status": self.status}
        return {
            "pairs": n,
            "status": self.status,
            "label_entropy_bits": round(self.entropy_bits / n, 4),
            "mean_p_chosen": round(self.p_chosen / n, 4),
            "position_consistency_rate": round(self.position_consistent / n, 4),
            "mean_chars_chosen": round(self.chars_chosen / n, 1),
            "mean_chars_rejected": round(self.chars_rejected / n, 1),
            "longer_is_chosen_rate": round(self.longer_is_chosen / n, 4),
            "mean_option_mass": round(self.option_mass / n, 4),
        }
