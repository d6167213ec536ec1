"""The run config of `cai run`: one YAML file, every stage's settings typed, validated whole when it loads.

The training sections are the trainers' own settings models (`TrainSettings`, `PPOSettings`, `GRPOSettings`,
`OnlineDPOSettings`), with the pipeline's smaller sizes as defaults under what the file gives; the generation
and eval sections take their defaults from `SftJob`, `PrefsJob` and `EvalJob`. A misspelt key anywhere is refused before any
stage runs, naming the file and the dotted key. `cai demo` is `cai run` on DEMO_CONFIG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from cai.constitution import DEFAULT_CONSTITUTION
from cai.errors import ConfigError
from cai.evaluate import EvalJob
from cai.generate.common import DEFAULT_POLICY_BACKEND, PolicyBackend
from cai.generate.prefs import PrefsJob
from cai.generate.sft import SftJob
from cai.models import DEFAULT_MODEL
from cai.monitors import Thresholds
from cai.train.rl.settings import GRPOSettings, OnlineDPOSettings, PPOSettings, RLOOJob
from cai.train.settings import TrainSettings
from judge_server.settings import BackendSettings


class RunConfigError(ConfigError):
    """A run config that can't be used; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeSection(_Section):
    model: str | None = Field(default=None, description="Judge model to serve (default: the policy model).")
    url: str | None = Field(default=None, description="Use a running judge server instead of starting one.")
    constitution: str = Field(default=DEFAULT_CONSTITUTION, description="Constitution file or shipped name.")
    backends: BackendSettings = Field(default_factory=BackendSettings, description="The model behind a judge the run starts: "
                                      "its own vLLM engine (default), or OpenAI-compatible servers (backend: openai, "
                                      "backend_url: [...], backend_model: NAME).")

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeSection:
        if self.url and self.backends.backend != "vllm":
            raise ValueError("give judge.url (a judge server already running) or judge.backends (a judge the run starts on "
                             "those servers), not both")
        return self


class PromptsSection(_Section):
    source: str = Field(default="donotanswer+mtbench", description="Prompt sets or files, joined with '+'.")
    n_eval: int = Field(default=12, ge=1, description="Held-out prompts for evaluation (never trained on), this many of each "
                        "kind (harmful, benign) the source has.")
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
    keep_unrevised: bool = Field(default=_SFT_JOB.keep_unrevised, description=SftJob.model_fields["keep_unrevised"].description)


class PrefsSection(_Section):
    source: Literal["judge", "revisions", "both"] = Field(default="judge", description="Pairs for the reward model / DPO: the "
                                                          "judge's labels of sampled answer pairs, the SFT data's revision pairs "
                                                          "(final revision over first answer: no comparison needed, for a small "
                                                          "or position-biased judge), or both.")
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
_RL_SIZES = {"gold_judge_every": 2, "iterations": 10, "batch_size": 8, "response_length": 48}
# RLOO is the GRPO trainer with other defaults: the fields whose default `cai train rloo` changes.
_RLOO_DEFAULTS = {name: field.default for name, field in RLOOJob.model_fields.items()
                  if name in GRPOSettings.model_fields and field.default != GRPOSettings.model_fields[name].default}
RunPPOSettings = Annotated[PPOSettings, _under(_RL_SIZES)]
RunGRPOSettings = Annotated[GRPOSettings, _under(_RL_SIZES)]
RunRLOOSettings = Annotated[GRPOSettings, _under({**_RL_SIZES, **_RLOO_DEFAULTS})]
RunOnlineDPOSettings = Annotated[OnlineDPOSettings, _under(_RL_SIZES)]

RLMethod = Literal["ppo", "grpo", "rloo", "online_dpo", "dpo"]


class RLSection(_Section):
    method: RLMethod = Field(default="ppo", description="How the SFT model is trained after it: ppo, grpo or rloo (online RL "
                             "against the reward: the trained reward model unless `reward` says otherwise), online_dpo (DPO "
                             "on pairs sampled from the policy at each step and labelled by the judge, both orders), or dpo "
                             "(offline, on the prefs stage's pairs). Each reads its own section below.")
    reward: str | None = Field(default=None, description="The reward of ppo, grpo, rloo and online_dpo, as `cai train ppo "
                               "--reward` takes it (a reward-model folder, 'judge', 'judge:pairwise', a rule, a weighted "
                               "sum); default: the rm stage's model (rm/final) for ppo, grpo and rloo, 'judge:pairwise' "
                               "for online_dpo. dpo takes none.")
    ppo: RunPPOSettings = Field(default_factory=dict, validate_default=True, description="PPO settings (`cai train ppo --help`).")
    grpo: RunGRPOSettings = Field(default_factory=dict, validate_default=True, description="GRPO settings (`cai train grpo --help`).")
    rloo: RunRLOOSettings = Field(default_factory=dict, validate_default=True, description="RLOO settings (`cai train rloo --help`).")
    online_dpo: RunOnlineDPOSettings = Field(default_factory=dict, validate_default=True,
                                             description="Online DPO settings (`cai train online-dpo --help`).")
    dpo: DpoSettings = Field(default_factory=dict, validate_default=True, description="DPO settings (`cai train dpo --help`).")

    @model_validator(mode="after")
    def _reward_for_online_methods(self) -> RLSection:
        if self.method == "dpo" and self.reward is not None:
            raise ValueError(f"reward {self.reward!r} is for the online methods (ppo, grpo, rloo, online_dpo); dpo trains "
                             "on the prefs stage's pairs: drop rl.reward or choose another rl.method")
        return self


class EvalSection(_Section):
    max_new_tokens: int = Field(default=EvalJob.model_fields["max_new_tokens"].default, ge=1, description="Longest answer of each model, in tokens.")
    human_pairs: str | None = Field(default=None, description=EvalJob.model_fields["human_pairs"].description)
    thresholds: Thresholds = Field(default_factory=dict, description="Per-monitor threshold overrides, e.g. "
                                   "{verbosity: {max_growth: 2.0}}; unknown monitors and thresholds are refused.")


class RunConfig(_Section):
    out: str = Field(description="Run folder: one sub-folder per stage, report.html at the top.")
    model: str = Field(default=DEFAULT_MODEL, description="Starting policy: folder, hub id or embedded name.")
    seed: int = 0
    policy_backend: PolicyBackend = DEFAULT_POLICY_BACKEND
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
    from cai.settings_file import load_settings

    try:
        return load_settings(path, {"out": out}, schema=RunConfig)
    except ConfigError as e:
        raise RunConfigError(str(e)) from None
