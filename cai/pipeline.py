"""`cai run CONFIG.yaml`: the whole Constitutional AI pipeline, one folder per stage, read top-down.

    prompts ─► sft-data ─► sft ─► prefs ─► rm ─► ppo | grpo | rloo | online_dpo | dpo ─► eval ─► report.html

1. prompts: the prompt set is shuffled (seeded); the first `n_eval` are held out for evaluation and
   the rest feed SFT data, preference data and RL (prompts/*.jsonl).
2. sft-data: critique -> revision with the judge; sft: LoRA SFT, merged into sft/merged.
3. prefs: the SFT model samples K answers per prompt and the judge labels every pair (both orders),
   and/or the SFT data's revision pairs (final revision over first answer) are taken (`prefs.source`).
4. rm: a reward model on the soft labels; then the SFT model is trained by `rl.method`: ppo, grpo or
   rloo, online RL against the reward model with a KL penalty to the SFT model (the judge also scores
   samples every few iterations, to watch for reward hacking); online_dpo, DPO on pairs sampled from the
   policy at each step and labelled by the judge (both orders); or dpo, offline on the prefs pairs.
5. eval: the base, SFT and trained models on the held-out prompts, by yardsticks the judge cannot bend
   (refusal, over-refusal, toxicity, length, diversity, with intervals), the judge's win rate of the
   trained model over the SFT model, and the monitors; report.html gathers everything.

One judge server serves every stage (started for a local model, or a given URL). stages.json records
each stage's status: a finished stage is skipped on a rerun; an interrupted one runs again and
resumes through its own checkpoint or row log. The run's settings (cai/run_config.py, validated whole
before any stage) are pinned in run.json: a rerun with other settings is refused rather than mixing
two runs in one folder; run_config.yaml holds them resolved, every default filled in, for people to
read. Below: the loop over the stages, then each stage in the order it runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cai.files import write_text_atomic
from cai.run_config import RunConfig, RunConfigError
from cai.train.rl.settings import GRPOJob, OnlineDPOJob, PPOJob, RLJob, RLOOJob, RLSettings
from cai.train.settings import TrainJob, TrainSettings

logger = logging.getLogger(__name__)


def run_pipeline(cfg: RunConfig, config_path: str | Path | None = None) -> Path:
    """Run every unfinished stage in order; returns the path of report.html."""
    from cai.constitution import find_constitution
    from cai.judge_launcher import judge_endpoint
    from cai.pinning import pin_settings
    from cai.report import write_report

    run_dir = Path(cfg.out)
    pin_settings(run_dir, cfg)
    write_text_atomic(run_dir / "run_config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    plan = stages(cfg)
    record = _load_record(run_dir, [name for name, _ in plan])
    todo = [(name, fn) for name, fn in plan if record[name]["status"] != "done"]
    if todo:
        if cfg.judge.url is None:
            logger.info("starting the judge server (vLLM, %s); the first start takes about a minute", cfg.judge.model or cfg.model)
        with judge_endpoint(cfg.judge.url, model=cfg.judge.model or cfg.model, constitution=find_constitution(cfg.judge.constitution),
                            log_path=run_dir / "judge.log", backends=cfg.judge.backends) as url:
            run = Run(cfg, url)
            for name, fn in todo:
                logger.info("stage %s: %s", name, "resuming" if record[name]["status"] == "running" else "starting")
                record[name].update(status="running")
                _save_record(run_dir, record)
                started = time.perf_counter()
                summary = fn(run)
                record[name].update(status="done", seconds=round((record[name].get("seconds") or 0) + time.perf_counter() - started, 1),
                                    summary=summary)
                _save_record(run_dir, record)
                try:
                    write_report(run_dir)  # a report after every stage, so a long run can be watched
                except Exception:  # noqa: BLE001 - the report must never cost a finished stage
                    logger.exception("could not write the report after stage %s", name)
    return write_report(run_dir)


def _load_record(run_dir: Path, names: list[str]) -> dict[str, dict]:
    path = run_dir / "stages.json"
    before = {s["name"]: s for s in json.loads(path.read_text(encoding="utf-8"))["stages"]} if path.exists() else {}
    return {name: before.get(name, {"name": name, "status": "pending", "seconds": None, "folder": name}) for name in names}


def _save_record(run_dir: Path, record: dict[str, dict]) -> None:
    write_text_atomic(run_dir / "stages.json", json.dumps({"stages": list(record.values())}, indent=2, default=str))


# -- the stages, in the order they run ---------------------------------------------------


def stages(cfg: RunConfig) -> list[tuple[str, Callable[[Run], dict]]]:
    """The stages in order; the RL stage is named (and writes to the folder named) after `rl.method`."""
    rl = {"ppo": ppo, "grpo": grpo, "rloo": rloo, "online_dpo": online_dpo, "dpo": dpo}[cfg.rl.method]
    return [("prompts", split_prompts), ("sft-data", sft_data), ("sft", sft), ("prefs", prefs), ("rm", rm), (cfg.rl.method, rl),
            ("eval", evaluate)]


class Run:
    """The run folder and the facts stages share: prompt files, the judge URL, earlier stages' outputs."""

    def __init__(self, cfg: RunConfig, judge_url: str | None = None):
        self.cfg, self.dir, self.judge_url = cfg, Path(cfg.out), judge_url

    def stage_dir(self, name: str) -> Path:
        return self.dir / name

    @property
    def sft_model(self) -> str:
        return str(self.stage_dir("sft") / "merged")

    @property
    def reward_model(self) -> str:
        return str(self.stage_dir("rm") / "final")

    @property
    def final_policy(self) -> str:
        return str(self.stage_dir(self.cfg.rl.method) / "merged")

    def prompt_file(self, part: str) -> str:
        return str(self.dir / "prompts" / f"{part}.jsonl")


def split_prompts(run: Run) -> dict:
    """Held-out eval prompts first (`n_eval` of each kind, harmful and benign, that the source has), then
    SFT / prefs / RL prompts from the rest (disjoint when there are enough)."""
    from cai.prompts import KINDS, load_prompts, require_kinds

    p = run.cfg.prompts
    prompts = load_prompts(p.source, seed=run.cfg.seed, shuffle=True)
    require_kinds(prompts, f"prompts.source {p.source!r}")  # the eval's yardsticks need them; refused now, not after training
    held_out = [q for kind in KINDS for q in [q for q in prompts if q.kind == kind][:p.n_eval]]
    chosen_ids = {q.id for q in held_out}
    pool = [q for q in prompts if q.id not in chosen_ids]
    if not pool:
        raise RunConfigError(f"prompts.source {p.source!r} has {len(prompts)} prompts, all held out by n_eval={p.n_eval}; "
                             "lower n_eval or add prompts")
    parts, start = {"eval": held_out}, 0
    for name, n in (("sft", p.n_sft), ("prefs", p.n_prefs), ("rl", p.n_rl)):
        parts[name] = [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
        start += n
    folder = run.dir / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, chosen in parts.items():
        Path(run.prompt_file(name)).write_text("".join(json.dumps({"prompt": q.text, "id": q.id, "kind": q.kind}, ensure_ascii=False) + "\n"
                                                        for q in chosen), encoding="utf-8")
    overlap = len({q.id for q in held_out} & {q.id for k in ("sft", "prefs", "rl") for q in parts[k]})
    return {name: len(v) for name, v in parts.items()} | {"eval_overlap_with_training": overlap,
                                                        **{f"eval_{k}": sum(q.kind == k for q in held_out) for k in KINDS}}


def sft_data(run: Run) -> dict:
    from cai.generate.sft import SftJob, generate_sft
    from cai.samples import SamplingConfig

    c = run.cfg
    return generate_sft(SftJob(prompts=run.prompt_file("sft"), out=run.stage_dir("sft-data"), policy=c.model,
                               constitution=c.judge.constitution, judge_url=run.judge_url, rounds=c.sft_data.rounds, seed=c.seed,
                               sampling=SamplingConfig(max_new_tokens=c.sft_data.max_new_tokens),
                               critique_tokens=c.sft_data.critique_tokens, revision_tokens=c.sft_data.revision_tokens,
                               keep_unrevised=c.sft_data.keep_unrevised, policy_backend=c.policy_backend))


def _seeded(run: Run, section: BaseModel) -> dict[str, Any]:
    """A stage's settings, with the run's seed unless the section sets its own."""
    return {**section.model_dump(), "seed": section.seed if "seed" in section.model_fields_set else run.cfg.seed}


def _train(run: Run, kind: str, model: str, data: Path, out: Path, section: TrainSettings, merge: bool) -> dict:
    from cai.train.merge import merge_lora
    from cai.train.run import run_training

    cfg = TrainJob(**_seeded(run, section), kind=kind, model=model, data=str(data), out=str(out))
    summary = run_training(cfg)
    if merge:
        if cfg.lora:
            merge_lora(out / "final", out / "merged")
        else:
            (out / "merged").symlink_to("final", target_is_directory=True)
    return summary


def sft(run: Run) -> dict:
    _require_sft_rows(run)
    return _train(run, "sft", run.cfg.model, run.stage_dir("sft-data") / "dataset", run.stage_dir("sft"), run.cfg.sft, merge=True)


def _require_sft_rows(run: Run) -> None:
    """Refuse to train on nothing: when sft-data kept no row, say why (from its summary) and what to do."""
    data = run.stage_dir("sft-data")
    if (data / "sft.jsonl").exists() and (data / "sft.jsonl").read_text(encoding="utf-8").strip():
        return
    summary = json.loads((data / "summary.json").read_text(encoding="utf-8")) if (data / "summary.json").exists() else {}
    dropped, rejected = summary.get("rows_dropped_unrevised") or 0, summary.get("revisions_rejected") or {}
    if dropped:
        reasons = "; ".join([f"{rejected.get('total')} of {rejected.get('of')}"] +
                            [", ".join(f"{why}: {n}" for why, n in rejected.items() if why not in ("total", "of"))])
        why = (f"sft-data dropped all {dropped} of its rows because none was revised (the judge's revisions rejected: {reasons}), "
               "and a row never revised would train the model on its own first answer")
    else:
        why = f"sft-data finished no row (see {data / 'progress.jsonl'} for each row's status and error)"
    raise RunConfigError(f"sft: no SFT rows to train on: {why}. A larger judge.model writes revisions that hold; or set "
                         "sft_data.keep_unrevised: true to train on the first answers anyway (in a new run folder, as sft-data "
                         "is done in this one)")


PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected", "p_chosen")


def prefs(run: Run) -> dict:
    """The pairs the reward model or DPO trains on (prefs/pairs), by `prefs.source`: the judge's labels of
    the SFT model's answer pairs (both orders), the SFT data's revision pairs (final revision over first
    answer, no comparison needed), or both. When the judge mostly keeps the same slot in both orders,
    its labels say more about position than quality, and the stage says to use the revision pairs."""
    from cai import monitors
    from cai.generate.common import write_rows
    from cai.generate.prefs import PREFS_TEMPERATURE, PrefsJob, generate_prefs
    from cai.samples import SamplingConfig
    from cai.train.data import load_rows

    c, out = run.cfg, run.stage_dir("prefs")
    summary: dict[str, Any] = {"source": c.prefs.source}
    rows: list[dict] = []
    if c.prefs.source in ("judge", "both"):
        summary["judge"] = generate_prefs(PrefsJob(
            prompts=run.prompt_file("prefs"), out=out, policy=run.sft_model, judge_model=c.judge.model or c.model,
            constitution=c.judge.constitution, judge_url=run.judge_url, samples=c.prefs.samples, n_principles=c.prefs.n_principles,
            seed=c.seed, sampling=SamplingConfig(max_new_tokens=c.prefs.max_new_tokens, temperature=PREFS_TEMPERATURE),
            policy_backend=c.policy_backend))
        judged = load_rows(out / "prefs.jsonl")
        rows += [{**{k: r[k] for k in PAIR_COLUMNS}, "source": "judge"} for r in judged]
        verdict = monitors.position_bias([r["same_position"] for r in judged], **c.eval.thresholds.get("position_bias", {}))
        summary["position_bias"] = verdict.message
        if verdict.flagged:
            summary["advice"] = ("the judge kept the same answer slot in both orders too often for its labels to be trusted; "
                                 "set prefs.source: revisions to train on the critique -> revision pairs, which need no comparison")
            logger.warning("prefs: %s; %s", verdict.message, summary["advice"])
    if c.prefs.source in ("revisions", "both"):
        revised = load_rows(run.stage_dir("sft-data") / "revision_pairs.jsonl")
        summary["revision_pairs"] = len(revised)
        rows += [{**{k: r[k] for k in PAIR_COLUMNS}, "source": "revision"} for r in revised]
    if not rows:
        raise RunConfigError(f"prefs: prefs.source {c.prefs.source!r} gave no pairs to train on{_why_no_revisions(run)} "
                             f"(see {out} and sft-data/)")
    write_rows(rows, out / "pairs.jsonl", out / "pairs")
    summary["pairs"] = len(rows)
    if c.prefs.source == "revisions":
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _why_no_revisions(run: Run) -> str:
    """Why sft-data gave no revision pairs, from its summary: the judge's revisions it rejected, and what to do."""
    path = run.stage_dir("sft-data") / "summary.json"
    rejected = json.loads(path.read_text(encoding="utf-8")).get("revisions_rejected") if path.exists() else None
    if not rejected or not rejected.get("total"):
        return ""
    reasons = ", ".join(f"{why}: {n}" for why, n in rejected.items() if why not in ("total", "of"))
    return (f": sft-data rejected {rejected['total']} of the judge's {rejected['of']} revisions ({reasons}); "
            "a larger judge.model revises, or prefs.source: judge | both adds the judge's labelled pairs")


def rm(run: Run) -> dict:
    return _train(run, "rm", run.sft_model, run.stage_dir("prefs") / "pairs", run.stage_dir("rm"), run.cfg.rm, merge=False)


def _online(run: Run, job: type[RLJob], section: RLSettings, train: Callable[[Any], dict], default_reward: str) -> dict:
    """An online RL stage (`rl.method` names it and its folder): `job` from the method's section, trained from the SFT
    model on the RL prompts with `rl.reward` (else `default_reward`), the judge at hand; the adapter merged after."""
    from cai.train.merge import merge_lora

    out = run.stage_dir(run.cfg.rl.method)
    cfg = job(**_seeded(run, section), model=run.sft_model, reward=run.cfg.rl.reward or default_reward,
              prompts=run.prompt_file("rl"), out=str(out), judge_url=run.judge_url)
    summary = train(cfg)
    merge_lora(out / "final", out / "merged")
    return summary


def ppo(run: Run) -> dict:
    from cai.train.rl.ppo import run_ppo

    return _online(run, PPOJob, run.cfg.rl.ppo, run_ppo, run.reward_model)


def grpo(run: Run) -> dict:
    from cai.train.rl.grpo import run_grpo

    return _online(run, GRPOJob, run.cfg.rl.grpo, run_grpo, run.reward_model)


def rloo(run: Run) -> dict:
    from cai.train.rl.grpo import run_grpo

    return _online(run, RLOOJob, run.cfg.rl.rloo, run_grpo, run.reward_model)


def online_dpo(run: Run) -> dict:
    from cai.train.rewards import PAIRWISE
    from cai.train.rl.online_dpo import run_online_dpo

    return _online(run, OnlineDPOJob, run.cfg.rl.online_dpo, run_online_dpo, PAIRWISE)


def dpo(run: Run) -> dict:
    return _train(run, "dpo", run.sft_model, run.stage_dir("prefs") / "pairs", run.stage_dir("dpo"), run.cfg.rl.dpo, merge=True)


def evaluate(run: Run) -> dict:
    from cai.evaluate import EvalJob, run_eval

    c = run.cfg
    doc = run_eval(EvalJob(policy=run.final_policy, reference=run.sft_model, base=c.model, prompts=run.prompt_file("eval"),
                           out=run.stage_dir("eval"), judge_url=run.judge_url, judge_model=c.judge.model or c.model,
                           constitution=c.judge.constitution, probes=c.prompts.probes, max_new_tokens=c.eval.max_new_tokens,
                           training=run.stage_dir(c.rl.method) if c.rl.method != "dpo" else None, prefs=run.stage_dir("prefs"),
                           human_pairs=c.eval.human_pairs, policy_backend=c.policy_backend, seed=c.seed, thresholds=c.eval.thresholds))
    return {k: doc[k] for k in ("win_rate", "lc_win_rate", "n_prompts")} | {
        "flagged": [m["name"] for m in doc["monitors"] if m["flagged"]]}
