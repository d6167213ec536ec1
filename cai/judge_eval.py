"""`cai judge eval`: how far a judge, under one or more constitutions, agrees with people.

What someone editing a constitution runs to see whether the edit helped. For each constitution the
same judge model compares the same human-labelled pairs (HH-RLHF transcripts, or prompt / chosen /
rejected rows with an optional soft human label `p_chosen`) in both orders, and the run reports,
each with a 95% interval:

- agreement: the share of pairs where the judge sides with the people's majority (the answer more
  than half of them preferred: `p_chosen` >= 0.5 reads as "chosen", as the reward model's accuracy
  does), a judge at exactly 0.5 counting half (its ties are also counted apart), overall and per
  principle (the principle drawn for that pair, or every principle with `each_principle`);
- position consistency: the share of pairs where the two orders did not pick the same slot;
- option mass: how much probability the judge put on the option tokens at all;
- label entropy: the mean binary entropy (bits) of its soft labels (1 = always undecided);
- calibration against the human label: Brier score and ECE (10 equal-width bins). The people's
  choice is put in slot A or B by a seeded coin per pair, so a judge that always says "A" is
  neither agreeing nor calibrated.

With two or more constitutions each one after the first gets a paired change in agreement on the
same pairs (Newcombe's interval and McNemar's exact test when no judgement tied, else a bootstrap over
pairs); the page and the JSON say how many such comparisons were made. Writes OUT/judge-eval.json, OUT/judged.jsonl (every judgement) and OUT/judge-eval.html
(plots). Answers go through the judge cache, so a killed run restarted with the same command only
asks what it had not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from pydantic import Field

from cai import intervals
from cai.constitution import DEFAULT_CONSTITUTION
from cai.errors import CaiError
from cai.files import write_text_atomic
from cai.human_labels import agreement, human_pairs
from cai.judge import JudgeConnection
from cai.models import DEFAULT_MODEL

logger = logging.getLogger(__name__)

ECE_BINS = 10


class JudgeEvalJob(JudgeConnection):
    """Settings of one `cai judge eval` run (its command-line options are made from these fields)."""

    pairs: str = Field(default="hh-harmless", description="Human-labelled pairs: HH-RLHF chosen/rejected transcripts, "
                       "prompt/chosen/rejected rows (optional p_chosen: the share of people preferring chosen), "
                       "or hh-harmless (48 shipped HH-RLHF pairs).")
    constitutions: list[str] = Field(default=[DEFAULT_CONSTITUTION], min_length=1, max_length=8,
                                     description="Constitution files or shipped names, compared side by side (comma-separated); "
                                     "a judge given by judge_url serves one, so only one then.")
    out: Path = Field(description="Output folder for judge-eval.json, judged.jsonl and judge-eval.html.")
    judge_model: str = Field(default=DEFAULT_MODEL, description="The judge model; a judge is started for each constitution.")
    limit: int = Field(default=64, ge=1, description="Use at most this many pairs (seeded order).")
    each_principle: bool = Field(default=False, description="Judge every pair under every principle (slower); default: one "
                                 "principle drawn per pair, as `cai generate prefs` does.")
    seed: int = Field(default=0, description="Seeds the pair order, the A/B placement, the principle draws and the intervals.")
    judge_cache: Path | None = Field(default=None, description="The judge answer cache (default ~/.cache/cai/judge-cache.sqlite).")


class JudgeEvalError(CaiError, ValueError):
    pass


# -- the figures ------------------------------------------------------------------------------------


def entropy_bits(p: float) -> float:
    """Binary entropy of a soft label, in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty equal-width bin of the predicted probability: its count, mean prediction and mean target."""
    index = np.minimum((probs * bins).astype(int), bins - 1)  # p = 1.0 belongs to the last bin
    return [{"bin": b, "n": int(mask.sum()), "mean_p": float(probs[mask].mean()), "mean_y": float(targets[mask].mean())}
            for b in range(bins) if (mask := index == b).any()]


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: per bin, |mean prediction - mean target| weighted by the bin's share of the items."""
    if len(probs) == 0:
        return float("nan")
    return float(sum(b["n"] * abs(b["mean_p"] - b["mean_y"]) for b in reliability_bins(probs, targets, bins)) / len(probs))


def _bootstrapped(statistic, n: int, seed: int) -> intervals.Estimate:
    if n == 0:
        return intervals.Estimate(None, None, None, 0)
    low, high = intervals.bootstrap_interval(statistic, n, seed)
    return intervals.Estimate(float(statistic(np.arange(n))), low, high, n)


def figures(judged: list[dict], seed: int) -> dict[str, Any]:
    """The trust figures of one constitution's judgements (one row per pair: p_a, y_a, agree, ...)."""
    p = np.array([r["p_a"] for r in judged], dtype=float)
    y = np.array([r["y_a"] for r in judged], dtype=float)
    n = len(judged)
    per_principle: dict[str, list[float]] = {}
    for r in judged:
        for pid, agrees in r["by_principle"].items():
            per_principle.setdefault(pid, []).append(agrees)
    return {
        "n_pairs": n,
        "agreement": intervals.rate([r["agree"] for r in judged]).as_dict(),
        "agreement_ties": sum(r["agree"] == 0.5 for r in judged),
        "position_consistency": intervals.rate([not r["same_position"] for r in judged]).as_dict(),
        "option_mass": intervals.mean([r["option_mass"] for r in judged], seed=seed).as_dict(),
        "label_entropy_bits": intervals.mean([entropy_bits(x) for x in p], seed=seed).as_dict(),
        "brier": _bootstrapped(lambda i: float(((p[i] - y[i]) ** 2).mean()), n, seed).as_dict(),
        "ece": _bootstrapped(lambda i: ece(p[i], y[i]), n, seed).as_dict(),
        "per_principle": {pid: intervals.rate(flags).as_dict() for pid, flags in sorted(per_principle.items())},
        "reliability": reliability_bins(p, y),
    }


# -- the run ----------------------------------------------------------------------------------------


def placements(pairs: list[dict], seed: int) -> list[bool]:
    """Per pair, whether the people's choice goes in slot A: a seeded coin, the same for every constitution."""
    return [random.Random(f"{seed}:placement:{i}").random() < 0.5 for i in range(len(pairs))]


def compare_requests(pairs: list[dict], chosen_first: list[bool], principle_ids: list[str] | None, seed: int) -> list:
    from judge_server import protocol as P

    reqs = []
    for i, (pair, first) in enumerate(zip(pairs, chosen_first)):
        a, b = (pair["chosen"], pair["rejected"]) if first else (pair["rejected"], pair["chosen"])
        for pid in principle_ids or [None]:
            reqs.append(P.CompareRequest(prompt=pair["prompt"], response_a=P.or_placeholder(a), response_b=P.or_placeholder(b),
                                         seed=seed + i, principle_ids=[pid] if pid else None))
    return reqs


def _judge_one(job: JudgeEvalJob, name: str, constitution, constitution_path: Path, pairs: list[dict], chosen_first: list[bool],
               out: Path, cache_path: Path) -> list[dict]:
    from cai.judge import compare_all, open_judge

    ids = [p.id for p in constitution.principles] if job.each_principle else None

    async def ask() -> list:
        async with open_judge(job, constitution=constitution, constitution_path=constitution_path, cache=cache_path,
                              log_path=out / "judge.log") as judge:
            return await compare_all(judge, compare_requests(pairs, chosen_first, ids, job.seed), f"judge eval: {constitution.name}",
                                     chunk=16)

    return judged_rows(name, constitution, pairs, chosen_first, asyncio.run(ask()))


def judged_rows(name: str, constitution, pairs: list[dict], chosen_first: list[bool], results: list) -> list[dict]:
    """One row per pair (p_a, y_a, agree, by_principle, ...) from the judge's answers to `compare_requests`, which
    asked each pair once or once per principle, in pair order."""
    per_pair = len(results) // len(pairs)
    rows = []
    for i, (pair, first) in enumerate(zip(pairs, chosen_first)):
        mine = results[i * per_pair:(i + 1) * per_pair]
        p_a = float(np.mean([r.p_a for r in mine]))
        p_chosen_human = pair.get("p_chosen", 1.0)
        # Everything below reads the same direction: the judge's and the people's probability that A is better.
        by_principle = {r.principle_ids[0]: agreement(r.p_a if first else 1.0 - r.p_a, p_chosen_human) for r in mine}
        rows.append({
            "pair": i, "constitution": name, "constitution_hash": constitution.hash, "model": mine[0].model,
            "chosen_in_a": first, "p_a": p_a, "y_a": p_chosen_human if first else 1.0 - p_chosen_human,
            "p_chosen": p_a if first else 1.0 - p_a, "agree": agreement(p_a if first else 1.0 - p_a, p_chosen_human),
            "same_position": float(np.mean([r.same_position for r in mine])) > 0.5,
            "option_mass": float(np.mean([r.option_mass for r in mine])), "by_principle": by_principle,
        })
    return rows


def agreement_change(before: list[dict], after: list[dict], seed: int) -> intervals.Change:
    """The paired change in agreement from the rows `before` to the rows `after` of the same pairs: Newcombe's interval
    and McNemar's test, or a bootstrap when a judgement tied (half-agreements are not 0/1)."""
    was, now = [r["agree"] for r in before], [r["agree"] for r in after]
    if 0.5 in was or 0.5 in now:
        return intervals.change(was, now, seed=seed)
    return intervals.paired_rate_change(was, now)


def run_judge_eval(job: JudgeEvalJob) -> dict[str, Any]:
    from cai.constitution import find_constitution, load_constitution
    from cai.judge_cache import default_cache_path

    if job.judge_url and len(job.constitutions) > 1:
        raise JudgeEvalError(f"--judge-url {job.judge_url} serves one constitution, and {len(job.constitutions)} were given; "
                             "leave --judge-url out to start a judge for each, or give one constitution")
    if len(set(job.constitutions)) != len(job.constitutions):
        raise JudgeEvalError(f"constitutions: {job.constitutions} names one twice")
    paths = {name: find_constitution(name) for name in job.constitutions}
    constitutions = {name: load_constitution(path) for name, path in paths.items()}  # every file checked before any judge starts
    pairs = human_pairs(job.pairs, job.limit, job.seed)
    if not pairs:
        raise JudgeEvalError(f"{job.pairs}: no pairs short enough to judge (each pair is kept to 1500 characters)")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = job.judge_cache or default_cache_path()
    chosen_first = placements(pairs, job.seed)
    judged: dict[str, list[dict]] = {}
    for name, constitution in constitutions.items():
        judged[name] = _judge_one(job, name, constitution, paths[name], pairs, chosen_first, out, cache_path)
    report = {name: {"hash": rows[0]["constitution_hash"], "model": rows[0]["model"], **figures(rows, job.seed)}
              for name, rows in judged.items()}
    first = job.constitutions[0]
    for name in job.constitutions[1:]:
        change = agreement_change(judged[first], judged[name], job.seed)
        report[name]["agreement_change_vs_first"] = {"from": first, **change.as_dict(), "moved": change.moved}
    doc = {"pairs": job.pairs, "n_pairs": len(pairs), "each_principle": job.each_principle, "seed": job.seed,
           "interval": "95%: Wilson for shares (a tie counts half), percentile bootstrap over pairs otherwise; agreement "
                       "changes paired on the same pairs: Newcombe's interval and McNemar's exact test at 5% (a bootstrap "
                       "when a judgement tied)",
           "comparisons": len(job.constitutions) - 1, "constitutions": report}
    write_text_atomic(out / "judged.jsonl", "".join(json.dumps(r) + "\n" for rows in judged.values() for r in rows))
    write_text_atomic(out / "judge-eval.json", json.dumps(doc, indent=2))
    write_text_atomic(out / "judge-eval.html", render_html(doc))
    return {"out": str(out), "n_pairs": len(pairs),
            "agreement": {name: r["agreement"]["value"] for name, r in report.items()},
            "position_consistency": {name: r["position_consistency"]["value"] for name, r in report.items()}}


# -- the page ---------------------------------------------------------------------------------------


TEMPLATE = Path(__file__).parent / "templates" / "judge_eval.html.j2"
PAGE_FIGURES = [("agreement with people", "agreement"), ("position consistency", "position_consistency"),
                ("option mass", "option_mass"), ("label entropy (bits)", "label_entropy_bits"), ("Brier", "brier"), ("ECE", "ece")]
"""The page's table: its row labels and the keys of each constitution's figures."""


def _fmt(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "-"
    if e.get("low") is None:
        return f"{e['value']:.3g} (n={e['n']})"
    return f"{e['value']:.3g} [{e['low']:.3g}, {e['high']:.3g}]"


def render_html(doc: dict) -> str:
    """The page of a judge-eval.json document (cai/templates/judge_eval.html.j2), self-contained: inline CSS, embedded PNGs."""
    from cai.report_plots import agreement_bars, reliability_plot

    rows = doc["constitutions"]
    plots = [agreement_bars({name: r["agreement"] for name, r in rows.items()}),
             reliability_plot({name: r["reliability"] for name, r in rows.items()})]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["estimate"] = _fmt
    return env.get_template(TEMPLATE.name).render(doc=doc, rows=rows, figures=PAGE_FIGURES, plots=plots)
