"""PPO's arithmetic (`cai.train.rl.math`, `cai.train.rl.ppo`) against hand-computed values and plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from cai.train.rl.math import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalised_rewards,
    kl_per_token,
    masked_whiten,
    policy_loss,
)
from cai.train.rl.ppo import gae, value_loss


def test_gae_matches_a_plain_loop_per_sequence():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    lengths = [9, 1, 4, 7, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (9 - n) for n in lengths])
    gamma, lam = 0.97, 0.9
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            assert advantages[b, t].item() == pytest.approx(running, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(running + values[b, t].item(), abs=1e-5)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_kl_penalised_rewards_by_hand():
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.5, 0.1, 0.2], [0.3, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = kl_penalised_rewards(scores, kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.01, -0.02 + 1.0], [-0.03 - 2.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 = (r - 1) - log r, r = q/p = exp(ref - logp)
    k3 = [(math.exp(-0.5) - 1) + 0.5, (math.exp(1.0) - 1) - 1.0]
    assert torch.allclose(kl_per_token(logp, ref, "k3"), torch.tensor([k3]), atol=1e-6)
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logp, ref, "k2")


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    adaptive.update(12.0, 100)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 100 / 1000)
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(3.0, 100)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.102 * 0.98)
    restored = AdaptiveKLController(0.5, 6.0, 1000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_clipped_losses_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), 5.0]])  # ratios 1.5 and 0.5; the third is masked
    adv = torch.tensor([[1.0, -1.0, 100.0]])
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    v_loss, v_stats = value_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.tensor([[0.0, 0.1, 0.0]]), mask, 0.2)
    # token 1: max((1-0)^2, (0.2-0)^2) = 1; token 2: 0.01 both ways
    assert v_loss.item() == pytest.approx(0.5 * (1.0 + 0.01) / 2)
    assert v_stats["clipfrac"].item() == 0.0


def test_masked_whiten_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(values, mask)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)
