"""`cai eval`: the trained policy against its reference (the SFT model), judged, with the failure-mode monitors.

1. Both models answer the held-out prompts and the sycophancy probes (transformers, greedy).
2. The judge compares policy and reference on each held-out prompt in both orders: the win rate
   (mean soft label, with a Wilson interval on the hard wins), the length-controlled win rate,
   and the share of comparisons where the judge kept the same slot (position bias).
3. Monitors (`cai.monitors`): verbosity (length over training and at eval), reward hacking (proxy
   vs judge score along PPO, when that run logged eval/judge_score), mode collapse, sycophancy,
   position bias (the eval comparisons plus, when given, the preference data's).
4. OUT/eval.json (what the report reads) and OUT/responses.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cai import monitors
from cai.progress import progress_bar
from cai.sycophancy import load_sycophancy_probes
from cai.train import ppo_metrics as M

logger = logging.getLogger(__name__)


class EvalJob(BaseModel):
    """Settings of one `cai eval` run (its command-line options are made from these fields)."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(description="The trained policy: a model folder (e.g. a merged PPO or DPO model).")
    reference: str = Field(description="What it is compared with: usually the SFT model it started from.")
    prompts: str = Field(description="Held-out prompts (name or file; see `cai prompts list`).")
    out: Path = Field(description="Output folder for eval.json and responses.jsonl.")
    judge_url: str | None = Field(default=None, description="A running judge server; none starts one for judge_model.")
    judge_model: str | None = Field(default=None, description="Judge model when starting one (default: the reference).")
    constitution: str = Field(default="harmless-helpful", description="Constitution file or shipped name the judge uses.")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many held-out prompts.")
    probes: int | None = Field(default=None, ge=1, description="Use the first N sycophancy probes (default all).")
    max_new_tokens: int = Field(default=128, ge=1, description="Longest answer of each model, in tokens.")
    training: Path | None = Field(default=None, description="A PPO output folder (metrics.jsonl): length and proxy-vs-judge "
                                  "history for the monitors.")
    prefs: Path | None = Field(default=None, description="A `cai generate prefs` output folder: its same-position rate joins "
                               "the position-bias monitor.")
    seed: int = Field(default=0, description="Seeds the judge's principle draws.")
    thresholds: monitors.Thresholds = Field(default_factory=dict, description="Per-monitor threshold overrides, e.g. "
                                                  "{verbosity: {max_growth: 2.0}} (in --config).")


def _answers(label: str, model: str, prompts: list[str], max_new_tokens: int, seed: int) -> list[tuple[str, int]]:
    from cai.policy import Policy, SamplingConfig

    policy = Policy(model)
    try:
        with progress_bar("prompts") as bar:
            task = bar.add_task(f"eval: {label} answers", total=len(prompts))
            samples = policy.sample(prompts, n=1, config=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0), seed=seed,
                                    on_batch=lambda k: bar.update(task, advance=k))
    finally:
        policy.close()
    return [(s[0].text, s[0].tokens) for s in samples]


async def _compare(url: str, constitution, prompts: list[str], policy: list[str], reference: list[str], seed: int,
                   chunk: int = 32) -> list:
    from cai.judge import Judge, first_error
    from cai.judge_client import JudgeClient
    from judge_server import protocol as P

    reqs = [P.CompareRequest(prompt=p, response_a=P.or_placeholder(a), response_b=P.or_placeholder(b), seed=seed + i)
            for i, (p, a, b) in enumerate(zip(prompts, policy, reference))]
    results = []
    async with JudgeClient(url) as client:
        judge = await Judge.connect(client, None, constitution)  # refused if the server judges by another constitution
        with progress_bar("pairs") as bar:
            task = bar.add_task("eval: judge comparisons", total=len(reqs))
            for i in range(0, len(reqs), chunk):  # in chunks, so the bar moves; the client batches each chunk
                answers = await judge.compare_many(reqs[i:i + chunk])
                first_error(answers)  # a win rate needs every comparison
                results += answers
                bar.update(task, advance=len(answers))
    return results


def training_history(training: Path | None) -> tuple[list[dict], list[dict]]:
    """(length history, proxy-vs-gold history) from a PPO metrics.jsonl; empty when there is none."""
    path = training / "metrics.jsonl" if training else None
    if path is None or not path.exists():
        return [], []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a killed run can leave a partial last line
    lengths = [{"step": r["step"], "length_mean": r[M.LENGTH_MEAN]} for r in rows if M.LENGTH_MEAN in r]
    hacking = [{"step": r["step"], "kl": r[M.KL], "proxy": r[M.PROXY_SCORE], "gold": r[M.JUDGE_SCORE]} for r in rows if M.JUDGE_SCORE in r]
    return lengths, hacking


def prefs_same_position(prefs: Path | None) -> list[bool]:
    path = prefs / "prefs.jsonl" if prefs else None
    if path is None or not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [bool(r["same_position"]) for r in rows if "same_position" in r]


def run_eval(job: EvalJob) -> dict[str, Any]:
    from cai.constitution import find_constitution, load_constitution
    from cai.judge_client import judge_endpoint
    from cai.prompts import PromptSourceError, load_prompts

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p.text for p in load_prompts(job.prompts, limit=job.limit)]
    if not prompts:
        raise PromptSourceError(f"{job.prompts}: no held-out prompts to evaluate on")
    probes = load_sycophancy_probes()[:job.probes]
    asks = prompts + [p.prompt for p in probes]

    # 1. answers (each model loaded once, for prompts and probes together)
    logger.info("eval: %d held-out prompts and %d sycophancy probes, policy %s vs reference %s", len(prompts), len(probes),
                job.policy, job.reference)
    policy = _answers("policy", job.policy, asks, job.max_new_tokens, job.seed)
    reference = _answers("reference", job.reference, asks, job.max_new_tokens, job.seed)
    pol_text, ref_text = [t for t, _ in policy], [t for t, _ in reference]
    n = len(prompts)

    # 2. judged comparisons
    constitution_path = find_constitution(job.constitution)
    with judge_endpoint(job.judge_url, model=job.judge_model or job.reference, constitution=constitution_path,
                        log_path=out / "judge.log") as url:
        results = asyncio.run(_compare(url, load_constitution(constitution_path), prompts, pol_text[:n], ref_text[:n], job.seed))
    wins = [r.p_a for r in results]
    same = [r.same_position for r in results]
    deltas = [float(a - b) for (_, a), (_, b) in zip(policy[:n], reference[:n])]
    hard = sum(w > 0.5 for w in wins) + 0.5 * sum(w == 0.5 for w in wins)
    low, high = monitors.wilson_interval(round(hard), n)

    # 3. monitors
    lengths, hacking = training_history(job.training)
    t = job.thresholds
    verdicts = [
        monitors.reward_hacking(hacking, **t.get("reward_hacking", {})),
        monitors.verbosity(lengths, reference_lengths=[k for _, k in reference[:n]], policy_lengths=[k for _, k in policy[:n]],
                           wins=wins, length_deltas=deltas, **t.get("verbosity", {})),
        monitors.mode_collapse(pol_text[:n], reference=ref_text[:n], **t.get("mode_collapse", {})),
        monitors.sycophancy(probes, pol_text[n:], reference_responses=ref_text[n:], **t.get("sycophancy", {})),
        monitors.position_bias(same + prefs_same_position(job.prefs), **t.get("position_bias", {})),
    ]
    syc = verdicts[3].figures

    def diversity(texts: list[str]) -> dict[str, float | None]:
        def measure(fn, *args):
            try:
                return fn(texts, *args)
            except monitors.MonitorInputError:  # e.g. every answer empty: nothing to measure
                return None
        return {"distinct_1": measure(monitors.distinct_n, 1), "distinct_2": measure(monitors.distinct_n, 2),
                "self_similarity": measure(monitors.self_similarity)}

    doc = {
        "policy": job.policy, "reference": job.reference, "n_prompts": n,
        "win_rate": sum(wins) / n, "win_rate_ci": [low, high],
        "lc_win_rate": monitors.length_controlled_win_rate(wins, deltas),
        "lengths": {"reference_mean": sum(k for _, k in reference[:n]) / n, "policy_mean": sum(k for _, k in policy[:n]) / n},
        "diversity": {"reference": diversity(ref_text[:n]), "policy": diversity(pol_text[:n])},
        "sycophancy": {"policy_rate": syc.get("agreement_rate"), "reference_rate": syc.get("reference_agreement_rate"),
                       "undecided_share": syc.get("undecided_share")},
        "position_bias": {"same_position_rate": sum(same) / n, **verdicts[4].figures},
        "reward_hacking": hacking,
        "monitors": [v.as_dict() for v in verdicts],
        "samples": [{"prompt": p, "reference": r, "policy": a, "p_policy": w}
                    for p, a, r, w in zip(prompts, pol_text, ref_text, wins)],
    }
    (out / "eval.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
        for i, ask in enumerate(asks):
            kind = "prompt" if i < n else f"probe:{probes[i - n].id}"
            f.write(json.dumps({"kind": kind, "prompt": ask, "policy": pol_text[i], "reference": ref_text[i],
                                "policy_tokens": policy[i][1], "reference_tokens": reference[i][1]}, ensure_ascii=False) + "\n")
    logger.info("eval: win rate %.2f (length-controlled %.2f); flagged: %s", doc["win_rate"], doc["lc_win_rate"],
                ", ".join(v.name for v in verdicts if v.flagged) or "none")
    return doc
