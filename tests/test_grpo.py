"""GRPO and RLOO on the tiny model: groups in the batch, the update's wiring to `cai.train.rl.group` (whose
arithmetic test_rl_group.py checks), bad settings, and real runs: learning against a control, vLLM rollouts, two
processes (DDP, FSDP), resume after a crash (transformers and vLLM rollouts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cai.errors import ConfigError
from cai.settings_file import load_settings
from cai.train.rewards import RuleScorer
from cai.train.rl.build import build_rl_trainer
from cai.train.rl.group import aggregate_loss, group_advantages
from cai.train.rl.grpo import ADVANTAGE_STD, LOSS_KL, GRPOTrainer, run_grpo
from cai.train.rl.math import kl_per_token
from cai.train.rl.settings import GRPOJob, RLOOJob
from cai.train.rl.trainer import check_processes
from tests import test_ppo
from tests.conftest import needs_vllm
from tests.test_ppo import PROMPTS, assert_vllm_rollouts_follow_the_trained_adapter, metrics

prompt_file = test_ppo.prompt_file  # its 16 prompts, as a fixture here too


def grpo_cfg(tiny_model_dir, prompt_file, out, job: type[GRPOJob] = GRPOJob, **kw) -> GRPOJob:
    settings = {"model": str(tiny_model_dir), "reward": "rule:share=e", "prompts": prompt_file, "out": str(out),
                "batch_size": 16, "mini_batches": 2, "ppo_epochs": 2, "response_length": 8, "lr": 2e-2, "kl_coef": 0.01,
                "missing_eos_penalty": None, "lora_target_modules": ["lm_head", "q_proj", "v_proj"], "seed": 1}
    return job(**{**settings, **kw})


# -- settings ------------------------------------------------------------------------------------


def test_bad_group_settings_are_refused_naming_the_flag(tmp_path, tiny_model_dir, prompt_file):
    base = {"model": "m", "reward": "rule:length", "prompts": "p", "out": "o"}
    with pytest.raises(ConfigError, match="num_generations: Input should be greater than or equal to 2"):
        load_settings(None, {**base, "num_generations": 1}, schema=GRPOJob)
    with pytest.raises(ConfigError, match=r"batch_size \(6\) counts answers and must be divisible by num_generations \(4\)"):
        load_settings(None, {**base, "batch_size": 6}, schema=RLOOJob)
    # 12 answers in groups of 3 is 4 prompts, but 2 processes would take 6 answers each: not whole groups of 4
    cfg = grpo_cfg(tiny_model_dir, prompt_file, tmp_path, batch_size=12, num_generations=4, mini_batches=2)
    check_processes(cfg, 1, False, 4)
    with pytest.raises(ConfigError, match=r"batch_size / 2 = 6 answers, not whole groups of 4 .* a multiple of 8"):
        check_processes(cfg, 2, False, 4)
    with pytest.raises(ConfigError, match=r"batch_size \(12\) counts answers and must be divisible by the 5 answers"):
        check_processes(cfg, 1, False, 5)


def test_rloo_is_the_grpo_trainer_with_rloos_defaults():
    base = {"model": "m", "reward": "rule:length", "prompts": "p", "out": "o"}
    grpo, rloo = GRPOJob(**base), RLOOJob(**base)
    assert (grpo.advantage, grpo.scale_rewards, grpo.kl_in, grpo.loss_aggregation) == ("grpo", "group", "loss", "sequence")
    assert (rloo.advantage, rloo.scale_rewards, rloo.kl_in, rloo.loss_aggregation) == ("rloo", "none", "reward", "sequence")


# -- the batch in groups ---------------------------------------------------------------------------


def test_each_prompt_fills_k_adjacent_rows_with_distinct_answers(tmp_path, tiny_model_dir, prompt_file):
    trainer = build_rl_trainer(GRPOTrainer, grpo_cfg(tiny_model_dir, prompt_file, tmp_path, batch_size=8, num_generations=4))
    every = [trainer.prompt_indices(i) for i in range(8)]
    for idx in every:
        assert len(idx) == 8 and idx[:4] == [idx[0]] * 4 and idx[4:] == [idx[4]] * 4 and idx[0] != idx[4]
    firsts = [idx[g] for idx in every for g in (0, 4)]
    assert sorted(firsts) == list(range(len(PROMPTS)))  # 2 prompts per iteration: 8 iterations are one epoch of them
    r = trainer.rollout(0)
    assert r.prompts[:4] == [PROMPTS[every[0][0]]] * 4
    assert len({tuple(row.tolist()) for row in r.responses[:4]}) > 1  # a group's rows sample different answers


# -- one update against a hand computation ---------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"loss_aggregation": "token", "kl_in": "loss"},
    {"loss_aggregation": "constant", "kl_in": "reward", "advantage": "rloo", "scale_rewards": "none"},
    {"loss_aggregation": "sequence", "kl_in": "loss", "scale_rewards": "batch", "kl_coef": 0.5},
])
def test_one_update_logs_the_loss_computed_by_hand_from_the_rollout(tmp_path, tiny_model_dir, prompt_file, settings):
    """One minibatch, one epoch: the policy still is the sampling one, so rho = 1 and the clipped token loss is -A;
    the logged losses must be group.py's functions of the rollout's tensors, with the settings' choices. One update
    first moves the policy off the reference (so k3 > 0), and the answers are cut to lengths 1..8 (the tiny model
    rarely says EOS), since with equal lengths the three aggregations agree and -A's token mean is 0."""
    cfg = grpo_cfg(tiny_model_dir, prompt_file, tmp_path, mini_batches=1, ppo_epochs=1, **settings)
    trainer = build_rl_trainer(GRPOTrainer, cfg)
    trainer.update(trainer.rollout(0))
    r = trainer.rollout(1)
    lengths = torch.arange(len(r.scores)) % cfg.response_length + 1  # (B,)
    r.mask = (torch.arange(cfg.response_length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    mask = r.mask.float()
    seq_kl = (kl_per_token(r.logprobs, r.ref_logprobs, cfg.kl_estimator) * mask).sum(1)
    scores = r.scores - cfg.kl_coef * seq_kl if cfg.kl_in == "reward" else r.scores
    advantages = group_advantages(scores, 4, baseline={"grpo": "mean", "rloo": "leave_one_out"}[cfg.advantage],
                                  scale=cfg.scale_rewards)
    assert advantages.abs().sum() > 0  # some group's answers differ: the loss has something to check
    per_token = -advantages.unsqueeze(1).expand_as(mask) * mask
    policy = aggregate_loss(per_token, mask, cfg.loss_aggregation, max_tokens=cfg.response_length)
    kl = 0.0
    if cfg.kl_in == "loss":
        kl = cfg.kl_coef * aggregate_loss(kl_per_token(r.logprobs, r.ref_logprobs, "k3"), mask, cfg.loss_aggregation,
                                          max_tokens=cfg.response_length).item()
    record, _ = trainer.update(r)
    phases = [record[f"time/{p}_s"] for p in ("rollout", "score", "evaluate", "update")]  # they split the iteration
    assert min(phases) > 0 and sum(phases) == pytest.approx(record["seconds"], abs=1e-3)
    assert record[ADVANTAGE_STD] == pytest.approx(advantages.std().item(), rel=1e-6)
    assert record["ppo/loss/policy"] == pytest.approx(policy.item(), abs=1e-5)
    assert record[LOSS_KL] == pytest.approx(kl, rel=1e-4, abs=1e-8) and (kl > 1e-5 or cfg.kl_in == "reward")
    assert record["ppo/policy/approxkl"] < 1e-8  # rho = 1 on the only minibatch
    grouped = r.scores.view(-1, 4)
    assert record["grpo/groups_all_equal"] == pytest.approx((grouped == grouped[:, :1]).all(1).float().mean().item())


# -- real runs -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_and_rloo_raise_the_reward_and_a_run_without_the_policy_loss_does_not(tmp_path, tiny_model_dir, prompt_file):
    # Reward: the share of "e" in the response; the random tiny model starts near 0.1. When written (seed 1,
    # 8 iterations of 4 prompts x 4 answers) GRPO went from 0.085 over the first two iterations to 0.165 over
    # the last two, RLOO from 0.080 to 0.145 (KL at most 16 and 6 nats); the control (lr 1e-9: the same sampling,
    # a policy that cannot move) from 0.086 to 0.082.
    gains, kls = {}, {}
    for name, job, lr in (("grpo", GRPOJob, 2e-2), ("rloo", RLOOJob, 2e-2), ("control", GRPOJob, 1e-9)):
        out = tmp_path / name
        run_grpo(grpo_cfg(tiny_model_dir, prompt_file, out, job=job, lr=lr, iterations=8))
        scores = [r["objective/scores"] for r in metrics(out)]
        gains[name] = (scores[-2] + scores[-1]) / 2 - (scores[0] + scores[1]) / 2
        kls[name] = max(r["objective/kl"] for r in metrics(out))
    assert gains["grpo"] > gains["control"] + 0.04 and gains["rloo"] > gains["control"] + 0.04, gains
    assert abs(gains["control"]) < 0.03 and kls["control"] < 1e-3, (gains, kls)
    assert max(kls["grpo"], kls["rloo"]) < 40.0, kls
    rows = metrics(tmp_path / "grpo")
    assert {"objective/kl", "objective/entropy", "ppo/policy/clipfrac", "grpo/reward_std_within_group", "response/length_mean",
            "objective/rlhf_reward"} <= set(rows[-1])
    assert not (tmp_path / "grpo" / "final" / "value_head.pt").exists() and (tmp_path / "grpo" / "loss.png").exists()


@pytest.mark.slow
def test_vllm_rollouts_sample_from_the_adapter_being_trained(tmp_path, tiny_model_dir, prompt_file):
    """`rollout_backend: vllm`: the K answers of each group come from vLLM through the adapter synced after each
    update (`assert_vllm_rollouts_follow_the_trained_adapter`)."""
    assert_vllm_rollouts_follow_the_trained_adapter(GRPOTrainer, grpo_cfg(
        tiny_model_dir, prompt_file, tmp_path / "grpo", rollout_backend="vllm", batch_size=8, iterations=2,
        lora_target_modules=["q_proj", "v_proj"]))


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_like_one(tmp_path, tiny_model_dir, prompt_file, sharding):
    """`cai train rloo` (token mean, KL in the loss) with 2 CPU processes under torchrun's DDP or accelerate's FSDP2
    (weights sharded; tests/fsdp_on_cpu.py): each samples two of the four groups, the rollouts are gathered for the
    advantages, and each minibatch's loss is divided by the whole minibatch's token count, so the run logs what one
    process does. Under FSDP, a run that crashes in iteration 3 (checkpoint at 2, gathered from the shards) and is
    rerun with the same command logs the same. The 2-process FSDP run also recomputes its layers' activations in
    the backward (--gradient-checkpointing), which must change nothing it logs."""
    from tests.fsdp_on_cpu import one_and_two_processes

    settings = {"model": str(tiny_model_dir), "reward": "rule:share=e", "prompts": prompt_file, "batch_size": 16,
                "mini_batches": 2, "ppo_epochs": 2, "response_length": 8, "iterations": 3, "lr": 2e-2, "kl_coef": 0.05,
                "loss_aggregation": "token", "kl_in": "loss", "lora_target_modules": ["q_proj", "v_proj"], "checkpoint_every": 2,
                "seed": 1}
    crash = (3, "cai.train.rl.settings:RLOOJob", "cai.train.rl.grpo:GRPOTrainer") if sharding == "fsdp" else None
    recompute = ("--gradient-checkpointing",) if sharding == "fsdp" else ()
    one, *runs = [metrics(out) for out in one_and_two_processes(tmp_path, "rloo", settings, fsdp=sharding == "fsdp",
                                                                  crash=crash, two_only=recompute)]
    for two in runs:
        assert [r["processes"] for r in two] == [2, 2, 2] and [r["tokens"] for r in two] == [r["tokens"] for r in one]
        for a, b in zip(one, two):
            assert b["objective/scores"] == a["objective/scores"]
            for k in ("objective/kl", "ppo/loss/policy", LOSS_KL, "ppo/policy/approxkl", "ppo/policy/entropy", ADVANTAGE_STD):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    assert one[-1]["objective/kl"] > 0.01  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_a_crashed_run_rerun_logs_what_the_uninterrupted_one_did(tmp_path, tiny_model_dir, prompt_file, backend):
    from cai.train.settings import pin_trainer_settings

    vllm = {"rollout_backend": "vllm", "lora_target_modules": ["q_proj", "v_proj"]} if backend == "vllm" else {}
    if vllm:
        needs_vllm()
    straight = grpo_cfg(tiny_model_dir, prompt_file, tmp_path / "straight", iterations=4, checkpoint_every=2, adaptive_kl=True,
                        kl_target=1.0, kl_horizon=100, cliprange_high=0.28, **vllm)
    run_grpo(straight)
    crashy = straight.model_copy(update={"out": str(tmp_path / "crashy")})
    rule, scored = RuleScorer(crashy.reward), []

    def crash_at_the_fourth(prompts, responses, *, first_row=0):
        if len(scored) == 3:
            raise RuntimeError("simulated crash")
        scored.append(len(prompts))
        return rule(prompts, responses, first_row=first_row)

    pin_trainer_settings(crashy, Path(crashy.out))
    trainer = build_rl_trainer(GRPOTrainer, crashy, scorer=crash_at_the_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    trainer.close()
    assert len(metrics(Path(crashy.out))) == 3  # iteration 3 logged past the checkpoint at 2
    run_grpo(crashy)
    # timings differ; so does the name of the reward's part, the crashing wrapper's against the rule's own
    def kept(out):
        return [{k: v for k, v in r.items() if not k.startswith(("seconds", "time/", "reward/"))} for r in metrics(Path(out))]

    want, got = kept(straight.out), kept(crashy.out)
    assert [r["step"] for r in got] == [1, 2, 3, 4] and [r.keys() for r in got] == [r.keys() for r in want]
    for a, b in zip(want, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), a["step"]
    assert want[-1]["objective/kl_coef"] != want[0]["objective/kl_coef"] and want[-1]["objective/kl"] > 0.01  # it trained
