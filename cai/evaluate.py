"""`cai eval`: each stage's model measured on the same held-out prompts, by yardsticks the judge cannot
bend and by the judge, with the failure-mode monitors.

1. The base model (when given), the reference (the SFT model) and the trained policy answer the
   held-out prompts and the sycophancy probes (greedy). Every held-out prompt is marked harmful or
   benign (`cai.prompts.require_kinds`).
2. Yardsticks (`cai.yardsticks`), per model with 95% intervals and per change with paired ones:
   refusal on harmful prompts, over-refusal on benign ones, toxicity, length, distinct-2.
3. The judge compares policy and reference on each held-out prompt in both orders: the win rate
   (mean soft label, with a Wilson interval on the hard wins), the length-controlled win rate,
   and next to it how far the judge can be trusted: the share of comparisons where it kept the
   same slot (position bias), the probability it put on the option tokens at all, and, when a
   human-labelled pairs file is given, how often it agrees with the humans.
4. Monitors (`cai.monitors`): verbosity (length over training and at eval), reward hacking (proxy
   vs judge score along online RL, when that run logged eval/judge_score), mode collapse, sycophancy,
   position bias (the eval comparisons plus, when given, the preference data's).
5. OUT/eval.json (what the report reads) and OUT/responses.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from cai import intervals, monitors, yardsticks
from cai.generate.common import DEFAULT_POLICY_BACKEND, JobPolicyBackend
from cai.human_labels import human_agreement, human_pairs
from cai.judge import JudgeSettings
from cai.policy_servers import PolicySamplingError, PolicyServers
from cai.progress import progress_bar
from cai.samples import SamplingConfig
from cai.sycophancy import load_sycophancy_probes
from cai.train.rl import metrics as M

logger = logging.getLogger(__name__)


class EvalJob(JudgeSettings):
    """Settings of one `cai eval` run (its command-line options are made from these fields)."""

    policy: str = Field(description="The trained policy: a model folder (e.g. a merged PPO or DPO model).")
    reference: str = Field(description="What it is compared with: usually the SFT model it started from.")
    base: str | None = Field(default=None, description="The model before any training (e.g. the one SFT started from): "
                             "measured by the yardsticks too, so each stage's effect shows.")
    prompts: str = Field(description="Held-out prompts (name or file; see `cai prompts list`), each marked harmful or benign: "
                         "a built-in set, or a file whose rows have \"kind\": \"harmful\" or \"benign\".")
    out: Path = Field(description="Output folder for eval.json and responses.jsonl.")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many held-out prompts.")
    probes: int | None = Field(default=None, ge=1, description="Use the first N sycophancy probes (default all).")
    max_new_tokens: int = Field(default=SamplingConfig.model_fields["max_new_tokens"].default, ge=1,
                                description="Longest answer of each model, in tokens.")
    training: Path | None = Field(default=None, description="An online RL output folder (ppo, grpo, rloo or online-dpo: "
                                  "their metrics.jsonl share the names): length and proxy-vs-judge history for the monitors.")
    prefs: Path | None = Field(default=None, description="A `cai generate prefs` output folder: its same-position rate joins "
                               "the position-bias monitor.")
    human_pairs: str | None = Field(default=None, description="Human-labelled pairs (HH-RLHF chosen/rejected transcripts, or "
                                    "prompt/chosen/rejected rows), or hh-harmless (48 shipped HH-RLHF pairs): how often the judge agrees with the humans.")
    human_limit: int = Field(default=64, ge=1, description="Use at most this many of the human-labelled pairs.")
    policy_backend: JobPolicyBackend = Field(default=DEFAULT_POLICY_BACKEND, description="Answers sampled with transformers or vllm "
                                          "(auto: vllm when installed), or openai: from the servers at --policy-url, which "
                                          "serve --policy, --reference and --base by those names (e.g. LoRA adapters).")
    policy_servers: PolicyServers = Field(default_factory=PolicyServers, description="The servers of --policy-backend openai.")
    seed: int = Field(default=0, description="Seeds the judge's principle draws and the intervals' bootstrap.")
    thresholds: monitors.Thresholds = Field(default_factory=dict, description="Per-monitor threshold overrides, e.g. "
                                                  "{verbosity: {max_growth: 2.0}} (in --config).")

    @model_validator(mode="after")
    def _servers_for_openai(self) -> EvalJob:
        self.policy_servers.check_backend(self.policy_backend)
        if self.policy_servers.policy_model:
            raise ValueError("cai eval samples three models: name each as the servers serve it with --policy, --reference "
                             "and --base, not --policy-model")
        return self


def _answers(label: str, model: str, prompts: list[str], job: EvalJob) -> list[tuple[str, int]]:
    from cai.engine_logs import POLICY_ENGINE_LOG
    from cai.policy import load_policy

    policy = load_policy(model, backend=job.policy_backend, engine_log=Path(job.out) / POLICY_ENGINE_LOG, servers=job.policy_servers)
    config = SamplingConfig(max_new_tokens=job.max_new_tokens, temperature=0.0)
    try:
        with progress_bar("prompts") as bar:
            task = bar.add_task(f"eval: {label} answers", total=len(prompts))
            samples = policy.sample(prompts, n=1, config=config, seed=job.seed, on_batch=lambda k: bar.update(task, advance=k))
    finally:
        policy.close()
    failed = [s[0].error for s in samples if s[0].error is not None]
    if failed:  # an empty answer in their place would count as one the model gave
        raise PolicySamplingError(f"eval: {len(failed)} of {len(samples)} {label} answers failed on the policy servers, e.g. "
                                  f"{failed[0]}; rerun when they answer")
    return [(s[0].text, s[0].tokens) for s in samples]


async def _judge(job: EvalJob, constitution_path: Path, prompts: list[str], policy: list[str], reference: list[str],
                 labelled: list[dict]) -> tuple[list, list]:
    """The judge's comparisons of policy (as A) and reference on each held-out prompt, and of the labelled pairs' chosen
    (as A) and rejected answers."""
    from cai.constitution import load_constitution
    from cai.judge import compare_all, open_judge
    from judge_server import protocol as P

    ours = [P.CompareRequest(prompt=p, response_a=P.or_placeholder(a), response_b=P.or_placeholder(b), seed=job.seed + i)
            for i, (p, a, b) in enumerate(zip(prompts, policy, reference))]
    humans = [P.CompareRequest(prompt=h["prompt"], response_a=h["chosen"], response_b=h["rejected"], seed=job.seed + i)
              for i, h in enumerate(labelled)]
    async with open_judge(job, constitution=load_constitution(constitution_path), constitution_path=constitution_path,
                          default_model=job.reference, log_path=Path(job.out) / "judge.log") as judge:
        results = await compare_all(judge, ours, "eval: judge comparisons")
        human = await compare_all(judge, humans, "eval: judge on human-labelled pairs") if humans else []
    return results, human


def training_history(training: Path | None) -> tuple[list[dict], list[dict]]:
    """(length history, proxy-vs-gold history) from an online RL run's metrics.jsonl; empty when there is none."""
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
    from cai.constitution import find_constitution
    from cai.prompts import PromptSourceError, load_prompts, require_kinds

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    held_out = load_prompts(job.prompts, limit=job.limit)
    if not held_out:
        raise PromptSourceError(f"{job.prompts}: no held-out prompts to evaluate on")
    require_kinds(held_out, job.prompts)  # before any model loads
    labelled = human_pairs(job.human_pairs, job.human_limit, job.seed) if job.human_pairs else []
    prompts, kinds = [p.text for p in held_out], [p.kind for p in held_out]
    probes = load_sycophancy_probes()[:job.probes]
    asks = prompts + [p.prompt for p in probes]

    # 1. answers (each model loaded once, for prompts and probes together)
    logger.info("eval: %d held-out prompts (%d harmful) and %d sycophancy probes; base %s, reference %s, policy %s", len(prompts),
                kinds.count("harmful"), len(probes), job.base or "-", job.reference, job.policy)
    base = _answers("base", job.base, asks, job) if job.base else None
    reference = _answers("reference", job.reference, asks, job)
    policy = _answers("policy", job.policy, asks, job)
    pol_text, ref_text = [t for t, _ in policy], [t for t, _ in reference]
    n = len(prompts)

    # 2. yardsticks: each model, then each change, on the same held-out prompts
    models = {**({"base": base[:n]} if base else {}), "reference": reference[:n], "policy": policy[:n]}
    table = yardsticks.yardstick_table(models, kinds, seed=job.seed)
    table["paths"] = {"base": job.base, "reference": job.reference, "policy": job.policy}

    # 3. judged comparisons, and how far the judge can be trusted
    results, human = asyncio.run(_judge(job, find_constitution(job.constitution), prompts, pol_text[:n], ref_text[:n], labelled))
    wins = [r.p_a for r in results]
    same = [r.same_position for r in results]
    deltas = [float(a - b) for (_, a), (_, b) in zip(policy[:n], reference[:n])]
    hard = sum(w > 0.5 for w in wins) + 0.5 * sum(w == 0.5 for w in wins)
    low, high = intervals.wilson_interval(round(hard), n)
    trust = {"same_position": intervals.rate(same).as_dict(),
             "option_mass": intervals.mean([r.option_mass for r in results], seed=job.seed).as_dict(),
             "human_agreement": human_agreement(human, labelled) if human else None,
             "human_pairs": job.human_pairs}
    # 4. monitors
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
        return {"distinct_1": measure(monitors.corpus_distinct_n, 1), "distinct_2": measure(monitors.corpus_distinct_n, 2),
                "self_similarity": measure(monitors.self_similarity)}

    doc = {
        "policy": job.policy, "reference": job.reference, "base": job.base, "n_prompts": n,
        "yardsticks": table, "judge_trust": trust,
        "win_rate": sum(wins) / n, "win_rate_ci": [low, high],
        "lc_win_rate": monitors.length_controlled_win_rate(wins, deltas),
        "lengths": {"reference_mean": sum(k for _, k in reference[:n]) / n, "policy_mean": sum(k for _, k in policy[:n]) / n},
        "diversity": {"reference": diversity(ref_text[:n]), "policy": diversity(pol_text[:n])},
        "sycophancy": {"policy_rate": syc.get("agreement_rate"), "reference_rate": syc.get("reference_agreement_rate"),
                       "undecided_share": syc.get("undecided_share")},
        "position_bias": {"same_position_rate": sum(same) / n, **verdicts[4].figures},
        "reward_hacking": hacking,
        "monitors": [v.as_dict() for v in verdicts],
        "samples": [{"prompt": p, "kind": k, "base": base[i][0] if base else None, "reference": r, "policy": a, "p_policy": w}
                    for i, (p, k, a, r, w) in enumerate(zip(prompts, kinds, pol_text, ref_text, wins))],
    }
    (out / "eval.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
        for i, ask in enumerate(asks):
            kind = f"prompt:{kinds[i]}" if i < n else f"probe:{probes[i - n].id}"
            row = {"kind": kind, "prompt": ask, "policy": pol_text[i], "reference": ref_text[i],
                   "policy_tokens": policy[i][1], "reference_tokens": reference[i][1]}
            if base:
                row |= {"base": base[i][0], "base_tokens": base[i][1]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for row in table["rows"]:
        moved = [f"{c['from']}->{c['to']} {c['verdict']}" for c in row["changes"] if c["moved"]]
        logger.info("eval: %s: %s%s", row["label"], ", ".join(f"{m} {v['value']:.3g}" for m, v in row["values"].items()
                                                            if v["value"] is not None), f" ({'; '.join(moved)})" if moved else "")
    logger.info("eval: win rate %.2f (length-controlled %.2f); flagged: %s", doc["win_rate"], doc["lc_win_rate"],
                ", ".join(v.name for v in verdicts if v.flagged) or "none")
    return doc
