"""`cai run CONFIG.yaml`: the whole Constitutional AI pipeline, one folder per stage.

    prompts ─► sft-data ─► sft ─► prefs ─► rm ─► ppo (or dpo) ─► eval ─► report.html

1. prompts: the prompt set is shuffled (seeded); the first `n_eval` are held out for evaluation and
   the rest feed SFT data, preference data and RL (prompts/*.jsonl).
2. sft-data: critique -> revision with the judge; sft: LoRA SFT, merged into sft/merged.
3. prefs: the SFT model samples K answers per prompt, the judge labels every pair (both orders).
4. rm: a reward model on the soft labels; ppo: RL against it with a KL penalty to the SFT model
   (the judge also scores samples every few iterations, to watch for reward hacking), or dpo.
5. eval: the trained policy against the SFT model on the held-out prompts, with the monitors;
   report.html gathers everything.

One judge server serves every stage (started for a local model, or a given URL). stages.json records
each stage's status: a finished stage is skipped on a rerun; an interrupted one runs again and
resumes through its own checkpoint or row log. The run's settings are pinned in run.json: a rerun with other settings is
refused rather than mixing two runs in one folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from cai.errors import ConfigError
from cai.evaluate import EvalJob
from cai.generate.prefs import PrefsJob
from cai.generate.sft import SftJob
from cai.train.config import TrainConfig, TrainSettings
from cai.train.ppo_config import PPOConfig, PPOSettings

logger = logging.getLogger(__name__)


class RunConfigError(ConfigError):
    """A run config that can't be used; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeSection(_Section):
    model: str | None = Field(default=None, description="Judge model to serve (default: the policy model).")
    url: str | None = Field(default=None, description="Use a running judge server instead of starting one.")
    constitution: str = Field(default="harmless-helpful", description="Constitution file or shipped name.")


class PromptsSection(_Section):
    source: str = Field(default="donotanswer+mtbench", description="Prompt sets or files, joined with '+'.")
    n_eval: int = Field(default=12, ge=1, description="Held-out prompts for evaluation (never trained on).")
    n_sft: int = Field(default=12, ge=1, description="Prompts for critique -> revision SFT data.")
    n_prefs: int = Field(default=16, ge=1, description="Prompts for preference pairs.")
    n_rl: int = Field(default=16, ge=1, description="Prompts PPO samples from.")
    probes: int | None = Field(default=20, ge=1, description="Sycophancy probes in the evaluation (null: all).")


# The defaults of the generation and eval sections are those of `cai generate sft|prefs` and `cai eval`
# (one place each); the training sections are the trainers' own settings models, with the pipeline's
# smaller sizes as defaults under what the config file gives.
_SFT_JOB, _PREFS_JOB = SftJob(prompts="", out=Path()), PrefsJob(prompts="", out=Path())


class SftDataSection(_Section):
    rounds: int = Field(default=_SFT_JOB.rounds, ge=1, description="Critique -> revision rounds per prompt.")
    max_new_tokens: int = Field(default=_SFT_JOB.sampling.max_new_tokens, ge=1, description="The policy's first answer, in tokens.")
    critique_tokens: int = Field(default=_SFT_JOB.critique_tokens, ge=1, description="Longest critique.")
    revision_tokens: int = Field(default=_SFT_JOB.revision_tokens, ge=1, description="Longest revision.")


class PrefsSection(_Section):
    samples: int = Field(default=_PREFS_JOB.samples, ge=2, description="Answers per prompt; every pair is labelled.")
    max_new_tokens: int = Field(default=_PREFS_JOB.sampling.max_new_tokens, ge=1, description="Longest answer, in tokens.")
    n_principles: int = Field(default=_PREFS_JOB.n_principles, ge=1, description="Principles ensembled per comparison.")


def _under(defaults: dict[str, Any]):
    """A section validated from the pipeline's `defaults` overlaid with what the file gives."""
    return BeforeValidator(lambda given: {**defaults, **given} if isinstance(given, dict) else given)


_SIZES = {"epochs": 2, "batch_size": 4, "max_length": 384}
SftSettings = Annotated[TrainSettings, _under({**_SIZES, "eval_fraction": 0.0})]
RmSettings = Annotated[TrainSettings, _under({**_SIZES, "eval_fraction": 0.2})]
DpoSettings = Annotated[TrainSettings, _under({**_SIZES, "eval_fraction": 0.0})]
RunPPOSettings = Annotated[PPOSettings, _under({"gold_judge_every": 2, "iterations": 10, "batch_size": 8, "response_length": 48})]


class RLSection(_Section):
    method: Literal["ppo", "dpo"] = Field(default="ppo", description="ppo (against the reward model) or dpo (on the pairs).")
    ppo: RunPPOSettings = Field(default_factory=dict, validate_default=True, description="PPO settings (`cai train ppo --help`).")
    dpo: DpoSettings = Field(default_factory=dict, validate_default=True, description="DPO settings (`cai train dpo --help`).")


class EvalSection(_Section):
    max_new_tokens: int = Field(default=EvalJob.model_fields["max_new_tokens"].default, ge=1, description="Longest answer of each model, in tokens.")
    thresholds: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-monitor threshold overrides.")


class RunConfig(_Section):
    out: str = Field(description="Run folder: one sub-folder per stage, report.html at the top.")
    model: str = Field(default="smollm2-135m-instruct", description="Starting policy: folder, hub id or embedded name.")
    seed: int = 0
    policy_backend: Literal["auto", "vllm", "transformers"] = "auto"
    judge: JudgeSection = Field(default_factory=JudgeSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    sft_data: SftDataSection = Field(default_factory=SftDataSection)
    sft: SftSettings = Field(default_factory=dict, validate_default=True, description="SFT settings (`cai train sft --help`).")
    prefs: PrefsSection = Field(default_factory=PrefsSection)
    rm: RmSettings = Field(default_factory=dict, validate_default=True, description="Reward-model settings (`cai train rm --help`).")
    rl: RLSection = Field(default_factory=RLSection)
    eval: EvalSection = Field(default_factory=EvalSection)


DEMO_CONFIG = Path(__file__).parent / "data" / "demo.yaml"
"""The demo run (`cai demo`, `make demo`): every stage on a 2-core CPU, commented line by line."""


def demo_config(*, out: str | None = None, model: str | None = None, judge_url: str | None = None) -> RunConfig:
    """The demo config, with another run folder, policy-and-judge model or judge server when given."""
    cfg = load_run_config(DEMO_CONFIG, out)
    if model is not None:
        cfg = cfg.model_copy(update={"model": model, "judge": cfg.judge.model_copy(update={"model": model})})
    if judge_url is not None:
        cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"url": judge_url})})
    return cfg


def load_run_config(path: str | Path, out: str | None = None) -> RunConfig:
    """The YAML run config, with `out` overriding its run folder; errors name the file and the dotted field."""
    from cai.config import load_config

    try:
        return load_config(path, {"out": out}, schema=RunConfig)
    except ConfigError as e:
        raise RunConfigError(str(e)) from None


# -- stages --------------------------------------------------------------------------------


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
    def final_policy(self) -> str:
        return str(self.stage_dir(self.cfg.rl.method) / "merged")

    def prompt_file(self, part: str) -> str:
        return str(self.dir / "prompts" / f"{part}.jsonl")


def split_prompts(run: Run) -> dict:
    """Held-out eval prompts first, then SFT / prefs / RL prompts from the rest (disjoint when there are enough)."""
    from cai.prompts import load_prompts

    p = run.cfg.prompts
    prompts = load_prompts(p.source, seed=run.cfg.seed, shuffle=True)
    if len(prompts) < p.n_eval + 1:
        raise RunConfigError(f"prompts.source {p.source!r} has {len(prompts)} prompts; need more than n_eval={p.n_eval}")
    held_out, pool = prompts[:p.n_eval], prompts[p.n_eval:]
    parts, start = {"eval": held_out}, 0
    for name, n in (("sft", p.n_sft), ("prefs", p.n_prefs), ("rl", p.n_rl)):
        parts[name] = [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
        start += n
    folder = run.dir / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, chosen in parts.items():
        Path(run.prompt_file(name)).write_text("".join(json.dumps({"prompt": q.text, "id": q.id}, ensure_ascii=False) + "\n"
                                                        for q in chosen), encoding="utf-8")
    overlap = len({q.id for q in held_out} & {q.id for k in ("sft", "prefs", "rl") for q in parts[k]})
    return {name: len(v) for name, v in parts.items()} | {"eval_overlap_with_training": overlap}


def sft_data(run: Run) -> dict:
    from cai.generate.sft import SftJob, generate_sft
    from cai.policy import SamplingConfig

    c = run.cfg
    return generate_sft(SftJob(prompts=run.prompt_file("sft"), out=run.stage_dir("sft-data"), policy=c.model,
                               constitution=c.judge.constitution, judge_url=run.judge_url, rounds=c.sft_data.rounds, seed=c.seed,
                               sampling=SamplingConfig(max_new_tokens=c.sft_data.max_new_tokens),
                               critique_tokens=c.sft_data.critique_tokens, revision_tokens=c.sft_data.revision_tokens,
                               policy_backend=c.policy_backend))


def _seeded(run: Run, section: BaseModel) -> dict[str, Any]:
    """A stage's settings, with the run's seed unless the section sets its own."""
    return {**section.model_dump(), "seed": section.seed if "seed" in section.model_fields_set else run.cfg.seed}


def _train(run: Run, kind: str, model: str, data: Path, out: Path, section: TrainSettings, merge: bool) -> dict:
    from cai.models import merge_lora
    from cai.train.run import run_training

    cfg = TrainConfig(**_seeded(run, section), kind=kind, model=model, data=str(data), out=str(out))
    summary = run_training(cfg)
    if merge:
        if cfg.lora:
            merge_lora(out / "final", out / "merged")
        else:
            (out / "merged").symlink_to("final", target_is_directory=True)
    return summary


def sft(run: Run) -> dict:
    return _train(run, "sft", run.cfg.model, run.stage_dir("sft-data") / "dataset", run.stage_dir("sft"), run.cfg.sft, merge=True)


def prefs(run: Run) -> dict:
    from cai.generate.prefs import PrefsJob, generate_prefs
    from cai.policy import SamplingConfig

    c = run.cfg
    return generate_prefs(PrefsJob(prompts=run.prompt_file("prefs"), out=run.stage_dir("prefs"), policy=run.sft_model,
                                   judge_model=c.judge.model or c.model, constitution=c.judge.constitution, judge_url=run.judge_url,
                                   samples=c.prefs.samples, n_principles=c.prefs.n_principles, seed=c.seed,
                                   sampling=SamplingConfig(max_new_tokens=c.prefs.max_new_tokens, temperature=1.0),
                                   policy_backend=c.policy_backend))


def rm(run: Run) -> dict:
    return _train(run, "rm", run.sft_model, run.stage_dir("prefs") / "dataset", run.stage_dir("rm"), run.cfg.rm, merge=False)


def ppo(run: Run) -> dict:
    from cai.models import merge_lora
    from cai.train.ppo import run_ppo

    out = run.stage_dir("ppo")
    cfg = PPOConfig(**_seeded(run, run.cfg.rl.ppo), model=run.sft_model, reward=str(run.stage_dir("rm") / "final"),
                    prompts=run.prompt_file("rl"), out=str(out), judge_url=run.judge_url)
    summary = run_ppo(cfg)
    merge_lora(out / "final", out / "merged")
    return summary


def dpo(run: Run) -> dict:
    return _train(run, "dpo", run.sft_model, run.stage_dir("prefs") / "dataset", run.stage_dir("dpo"), run.cfg.rl.dpo, merge=True)


def evaluate(run: Run) -> dict:
    from cai.evaluate import run_eval

    c = run.cfg
    doc = run_eval(EvalJob(policy=run.final_policy, reference=run.sft_model, prompts=run.prompt_file("eval"),
                           out=run.stage_dir("eval"), judge_url=run.judge_url, judge_model=c.judge.model or c.model,
                           constitution=c.judge.constitution, probes=c.prompts.probes, max_new_tokens=c.eval.max_new_tokens,
                           training=run.stage_dir("ppo") if c.rl.method == "ppo" else None, prefs=run.stage_dir("prefs"),
                           seed=c.seed, thresholds=c.eval.thresholds))
    return {k: doc[k] for k in ("win_rate", "lc_win_rate", "n_prompts")} | {
        "flagged": [m["name"] for m in doc["monitors"] if m["flagged"]]}


def stages(cfg: RunConfig) -> list[tuple[str, Callable[[Run], dict]]]:
    rl = ("ppo", ppo) if cfg.rl.method == "ppo" else ("dpo", dpo)
    return [("prompts", split_prompts), ("sft-data", sft_data), ("sft", sft), ("prefs", prefs), ("rm", rm), rl, ("eval", evaluate)]


# -- the run -------------------------------------------------------------------------------


def run_pipeline(cfg: RunConfig, config_path: str | Path | None = None) -> Path:
    """Run every unfinished stage in order; returns the path of report.html."""
    from cai.constitution import find_constitution
    from cai.judge_client import judge_endpoint
    from cai.pinning import pin_settings
    from cai.report import write_report

    run_dir = Path(cfg.out)
    pin_settings(run_dir, cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False), encoding="utf-8")
    plan = stages(cfg)
    record = _load_record(run_dir, [name for name, _ in plan])
    todo = [(name, fn) for name, fn in plan if record[name]["status"] != "done"]
    if todo:
        if cfg.judge.url is None:
            logger.info("starting the judge server (vLLM, %s); the first start takes about a minute", cfg.judge.model or cfg.model)
        with judge_endpoint(cfg.judge.url, model=cfg.judge.model or cfg.model, constitution=find_constitution(cfg.judge.constitution),
                            log_path=run_dir / "judge.log") as url:
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
    tmp = run_dir / "stages.json.tmp"
    tmp.write_text(json.dumps({"stages": list(record.values())}, indent=2, default=str), encoding="utf-8")
    tmp.replace(run_dir / "stages.json")
