"""The defaults that matter live in one place: the trainers share the LoRA and optimiser settings, PPO's
KL settings are one piece, `cai run`'s sections default to the commands' own, and a run folder pinned
with the flat settings of earlier versions still resumes."""

from pathlib import Path

import pytest
import yaml

from cai.evaluate import EvalJob
from cai.generate.prefs import PREFS_TEMPERATURE, PrefsJob
from cai.generate.sft import SftJob
from cai.pinning import pin_settings
from cai.run_config import RunConfig
from cai.samples import SamplingConfig
from cai.train.rl.math import AdaptiveKLController, FixedKLController
from cai.train.rl.settings import KLSettings, PPOJob, PPOSettings
from cai.train.settings import UNPINNED, LoraSettings, OptimiserSettings, TrainJob, TrainSettings

SHARED = [*LoraSettings.model_fields, *OptimiserSettings.model_fields]


@pytest.mark.parametrize("trainer", [TrainSettings, PPOSettings])
def test_trainers_inherit_the_shared_pieces_without_redeclaring_a_field(trainer):
    assert issubclass(trainer, LoraSettings) and issubclass(trainer, OptimiserSettings)
    assert not set(SHARED) & set(trainer.__annotations__)  # a field declared again would be a second default
    assert {k: getattr(trainer(), k) for k in SHARED} == {**LoraSettings().model_dump(), **OptimiserSettings().model_dump()}


def test_the_kl_piece_makes_the_controller():
    assert issubclass(PPOSettings, KLSettings)
    assert not set(KLSettings.model_fields) & set(PPOSettings.__annotations__)
    assert isinstance(PPOSettings().controller(), FixedKLController)
    adaptive = PPOSettings(adaptive_kl=True, kl_coef=0.2, kl_target=3.0, kl_horizon=500).controller()
    assert isinstance(adaptive, AdaptiveKLController) and (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 3.0, 500)


def test_prefs_sample_at_one_temperature_given_whole_or_in_part():
    job = PrefsJob(prompts="", out=Path())
    assert job.sampling.temperature == PREFS_TEMPERATURE != SamplingConfig().temperature
    assert PrefsJob(prompts="", out=Path(), sampling={"max_new_tokens": 5}).sampling.temperature == PREFS_TEMPERATURE


def test_run_sections_default_to_the_commands_own():
    run = RunConfig(out="run")
    sft_job, prefs_job = SftJob(prompts="", out=Path()), PrefsJob(prompts="", out=Path())
    assert run.sft_data.max_new_tokens == sft_job.sampling.max_new_tokens == SamplingConfig().max_new_tokens
    assert run.prefs.max_new_tokens == prefs_job.sampling.max_new_tokens == SamplingConfig().max_new_tokens
    assert (run.sft_data.rounds, run.sft_data.critique_tokens, run.sft_data.revision_tokens) == (
        sft_job.rounds, sft_job.critique_tokens, sft_job.revision_tokens)
    assert (run.prefs.samples, run.prefs.n_principles) == (prefs_job.samples, prefs_job.n_principles)
    assert run.eval.max_new_tokens == EvalJob.model_fields["max_new_tokens"].default
    # The training sections are the trainers' models; the pipeline only shrinks sizes (epochs, batches, lengths).
    sizes = {"epochs", "batch_size", "max_length", "eval_fraction", "gold_judge_every", "iterations", "response_length"}
    for section, command in [(run.sft, TrainSettings()), (run.rm, TrainSettings()), (run.rl.dpo, TrainSettings()),
                             (run.rl.ppo, PPOSettings())]:
        assert type(section) is type(command)
        assert {k: v for k, v in section.model_dump().items() if k not in sizes} == {
            k: v for k, v in command.model_dump().items() if k not in sizes}


# config.yaml as trainers pinned it before the LoRA, optimiser and KL settings were shared pieces (same keys, flat).
PINNED_PPO = """\
gold_judge_every: 0
max_prompts: null
max_prompt_length: 256
iterations: 100
batch_size: 8
mini_batches: 2
ppo_epochs: 1
forward_batch_size: null
response_length: 64
temperature: 1.0
kl_coef: 0.05
kl_estimator: k1
adaptive_kl: false
kl_target: 6.0
kl_horizon: 10000
gamma: 1.0
lam: 0.95
cliprange: 0.2
cliprange_value: 0.2
vf_coef: 0.1
ent_coef: 0.0
whiten_rewards: false
missing_eos_penalty: 1.0
lr: 5.0e-05
lora_r: 8
lora_alpha: 16
lora_target_modules: all-linear
lora_dropout: 0.0
max_grad_norm: 1.0
checkpoint_every: 10
log_samples_every: 10
rollout_backend: transformers
vllm_gpu_memory_utilization: 0.3
precision: auto
merged_rollouts: true
gather_for_generation: true
rollout_cache: dynamic
seed: 0
model: m
reward: rule:length
prompts: p
out: o
judge_url: null
"""

PINNED_SFT = """\
eval_fraction: 0.1
lora: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_modules: all-linear
lr: 0.0001
weight_decay: 0.0
batch_size: 4
grad_accum: 1
epochs: 1
max_steps: null
max_length: 512
max_grad_norm: 1.0
beta: 0.1
rpo_alpha: 0.0
checkpoint_every: 50
precision: auto
seed: 0
kind: sft
model: m
data: d
out: o
"""


@pytest.mark.parametrize("pinned,cfg", [(PINNED_PPO, PPOJob(model="m", reward="rule:length", prompts="p", out="o")),
                                        (PINNED_SFT, TrainJob(kind="sft", model="m", data="d", out="o"))], ids=["ppo", "sft"])
def test_a_run_pinned_before_the_shared_pieces_still_resumes(tmp_path, pinned, cfg):
    # the dumped shape stayed flat (the trackers and gradient checkpointing came later, and are not pinned)
    assert set(cfg.model_dump()) - set(UNPINNED) == set(yaml.safe_load(pinned))
    (tmp_path / "config.yaml").write_text(pinned)  # a trainer's folder from before run.json: config.yaml beside its checkpoint
    (tmp_path / "checkpoint").mkdir()
    pin_settings(tmp_path, cfg)  # no RunMismatchError


@pytest.mark.parametrize("job", [PPOJob(model="m", reward="rule:length", prompts="p", out="o"),
                                 TrainJob(kind="sft", model="m", data="d", out="o")], ids=["ppo", "sft"])
def test_a_run_resumes_with_gradient_checkpointing_turned_on_but_not_with_another_lr(tmp_path, job):
    """A run that ran out of memory may be rerun with --gradient-checkpointing (it computes the same); a setting that
    changes what it computes is still refused."""
    from cai.pinning import RunMismatchError
    from cai.train.checkpoint import STATE_FILE
    from cai.train.settings import pin_trainer_settings

    pin_trainer_settings(job, tmp_path)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / STATE_FILE).write_text("{}")
    pin_trainer_settings(job.model_copy(update={"gradient_checkpointing": True}), tmp_path)
    with pytest.raises(RunMismatchError, match="lr"):
        pin_trainer_settings(job.model_copy(update={"lr": job.lr * 2}), tmp_path)
