"""Group-baseline arithmetic (`cai.train.rl.group`) against plain loops and TRL's formulas.

The TRL formulas below are written out from huggingface/trl 1.10.0.dev0 (commit f2cd577, July 2026):
trl/trainer/grpo_trainer.py `_generate_and_score_completions` (advantages) and `_compute_loss`
(clipping, the k3 KL term and the loss_type normalisers), trl/trainer/rloo_trainer.py (the
leave-one-out baseline), trl/trainer/utils.py `nanstd` (Bessel-corrected std).
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from cai.train.rl.group import aggregate_loss, clipped_token_loss, group_advantages, loss_denominator
from cai.train.rl.math import kl_per_token


def _batch(groups: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(groups * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _uneven_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)


def _loop_advantages(scores: list[float], k: int, baseline: str, scale: str, eps: float) -> list[float]:
    out = []
    batch_std = statistics.stdev(scores)
    for start in range(0, len(scores), k):
        group = scores[start:start + k]
        for i, r in enumerate(group):
            if baseline == "mean":
                advantage = r - sum(group) / k
            else:
                others = group[:i] + group[i + 1:]
                advantage = r - sum(others) / len(others)
            if scale == "group":
                advantage /= statistics.stdev(group) + eps
            elif scale == "batch":
                advantage /= batch_std + eps
            out.append(advantage)
    return out


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_a_plain_loop(baseline, scale):
    scores = _batch(groups=4, k=5, seed=1)
    got = group_advantages(scores, 5, baseline=baseline, scale=scale, eps=1e-4)
    want = _loop_advantages(scores.tolist(), 5, baseline, scale, 1e-4)
    assert got.tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(scale):
    # TRL GRPOTrainer: mean_grouped = rewards.view(-1, K).mean(1) repeated K times; std = nanstd over the
    # group ("group", and "none" only for logging) or over all rewards ("batch"); advantages = rewards -
    # mean_grouped, divided by (std + 1e-4) unless scale_rewards == "none".
    rewards, k = _batch(groups=3, k=4, seed=2), 4
    mean_grouped = rewards.view(-1, k).mean(1).repeat_interleave(k)
    std = rewards.view(-1, k).std(1).repeat_interleave(k) if scale == "group" else rewards.std().expand_as(rewards)
    trl = rewards - mean_grouped
    if scale != "none":
        trl = trl / (std + 1e-4)
    assert torch.allclose(group_advantages(rewards, k, baseline="mean", scale=scale), trl, atol=1e-12)


def test_rloo_advantages_match_trl_and_the_k_over_k_minus_1_identity():
    # TRL RLOOTrainer: baselines = (group sum - r_i) / (K - 1); advantages = rewards - baselines.
    rewards, k = _batch(groups=3, k=4, seed=3), 4
    grouped = rewards.view(-1, k)
    trl = rewards - ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).view(-1)
    got = group_advantages(rewards, k, baseline="leave_one_out", scale="none")
    assert torch.allclose(got, trl, atol=1e-12)
    centred = group_advantages(rewards, k, baseline="mean", scale="none")
    assert torch.allclose(got, k / (k - 1) * centred, atol=1e-12)
    assert not torch.allclose(got, centred, atol=1e-3)


def test_group_scale_uses_the_unbiased_std_by_hand():
    # Group [1, 3]: mean 2, unbiased std sqrt(2); the biased std (1) would give +-1.
    got = group_advantages(torch.tensor([1.0, 3.0]), 2, scale="group", eps=0.0)
    assert got.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_a_group_of_equal_scores_gets_zero_advantage():
    scores = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.0])
    got = group_advantages(scores, 3, scale="group")
    assert got[:3].abs().max() == 0 and got[3:].abs().min() > 0.5


def test_advantage_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(torch.zeros(4), 1, baseline="leave_one_out")
    with pytest.raises(ValueError, match="groups of k=3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(torch.zeros(4), 2, baseline="median")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


LENGTHS, WIDTH = [7, 1, 4, 0, 6, 3], 7


def _loss_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    per_token = torch.randn(len(LENGTHS), WIDTH, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    per_token[_uneven_mask(LENGTHS, WIDTH) == 0] = 1e6  # padding must never count
    return per_token, _uneven_mask(LENGTHS, WIDTH)


def test_aggregations_match_plain_loops():
    per_token, mask = _loss_inputs()
    rows = [per_token[b, :n].tolist() for b, n in enumerate(LENGTHS)]
    sequence = sum(sum(row) / len(row) for row in rows if row) / len(rows)
    token = sum(sum(row) for row in rows) / sum(LENGTHS)
    constant = sum(sum(row) for row in rows) / (len(rows) * 10)
    assert aggregate_loss(per_token, mask, "sequence").item() == pytest.approx(sequence, abs=1e-12)
    assert aggregate_loss(per_token, mask, "token").item() == pytest.approx(token, abs=1e-12)
    assert aggregate_loss(per_token, mask, "constant", max_tokens=10).item() == pytest.approx(constant, abs=1e-12)


def test_aggregations_match_trl_loss_types():
    # TRL _compute_loss: "grpo" ((l * m).sum(-1) / m.sum(-1).clamp(min=1)).mean(); "bnpo" (l * m).sum() /
    # m.sum().clamp(min=1); "dr_grpo" (l * m).sum() / (B * max_completion_length); "dapo" (l * m).sum() /
    # (global num_items_in_batch / num_processes), which on one process is bnpo.
    per_token, mask = _loss_inputs()
    masked = per_token * mask
    assert torch.allclose(aggregate_loss(per_token, mask, "sequence"), (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean())
    assert torch.allclose(aggregate_loss(per_token, mask, "token"), masked.sum() / mask.sum())
    assert torch.allclose(aggregate_loss(per_token, mask, "constant", max_tokens=12), masked.sum() / (len(LENGTHS) * 12))


def test_constant_divides_by_rows_times_max_tokens_whatever_the_lengths():
    per_token = torch.ones(2, 3)
    short, long = torch.tensor([[1.0, 0, 0], [1, 0, 0]]), torch.ones(2, 3)
    assert aggregate_loss(per_token, short, "constant", max_tokens=8).item() == pytest.approx(2 / 16)
    assert aggregate_loss(per_token, long, "constant", max_tokens=8).item() == pytest.approx(6 / 16)
    assert aggregate_loss(per_token, short, "token").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate_loss(per_token, short, "constant")
    with pytest.raises(ValueError, match="3 tokens wide"):
        aggregate_loss(per_token, short, "constant", max_tokens=2)


@pytest.mark.parametrize("mode", ["sequence", "token", "constant"])
def test_shares_with_the_global_denominator_add_up_to_the_whole_batch(mode):
    per_token, mask = _loss_inputs()
    whole = aggregate_loss(per_token, mask, mode, max_tokens=WIDTH)
    halves = [(per_token[:3], mask[:3]), (per_token[3:], mask[3:])]
    denominator = sum(loss_denominator(m, mode, max_tokens=WIDTH) for _, m in halves)
    shares = [aggregate_loss(p, m, mode, max_tokens=WIDTH, denominator=denominator) for p, m in halves]
    assert (shares[0] + shares[1]).item() == pytest.approx(whole.item(), abs=1e-12)
    if mode == "token":  # each half's own token mean would weigh the halves' tokens unequally
        local = [aggregate_loss(p, m, mode) for p, m in halves]
        assert (local[0] + local[1]).item() / 2 != pytest.approx(whole.item(), abs=1e-3)


def _loop_clipped(logp: list[float], old: list[float], advantage: float, low: float, high: float) -> list[float]:
    out = []
    for a, b in zip(logp, old):
        ratio = math.exp(a - b)
        clipped = min(max(ratio, 1 - low), 1 + high)
        out.append(-min(ratio * advantage, clipped * advantage))
    return out


def test_clipped_token_loss_matches_a_loop_and_zeroes_padding():
    g = torch.Generator().manual_seed(5)
    logprobs = torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5 - 2
    old = logprobs + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.4
    advantages = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=torch.float64)
    lengths = [6, 2, 4, 5]
    mask = _uneven_mask(lengths, 6)
    loss, stats = clipped_token_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.28)
    for b, n in enumerate(lengths):
        want = _loop_clipped(logprobs[b, :n].tolist(), old[b, :n].tolist(), advantages[b].item(), 0.2, 0.28)
        assert loss[b, :n].tolist() == pytest.approx(want, abs=1e-12)
        assert loss[b, n:].abs().sum() == 0
    ratio, adv = (logprobs - old).exp(), advantages.unsqueeze(1)
    clipped = ((ratio > 1.28) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    assert stats["clipfrac"].item() == pytest.approx((clipped * mask).sum().item() / mask.sum().item())
    assert 0 < stats["clipfrac"] < 1
    assert stats["approxkl"].item() == pytest.approx((0.5 * (logprobs - old) ** 2 * mask).sum().item() / mask.sum().item())


def test_clip_higher_is_asymmetric():
    # ratio 1.25: inside 1 + 0.28 (A > 0 keeps the gradient), but beyond 1 + 0.2 with symmetric clipping.
    # ratio 0.75: below 1 - 0.2 for A < 0 in both.
    logprobs = torch.log(torch.tensor([[1.25, 0.75]], dtype=torch.float64, requires_grad=False))
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2)
    for advantage, token, expected_high, expected_sym in [(1.0, 0, -1.25, -1.2), (-1.0, 1, 0.8, 0.8)]:
        adv = torch.tensor([advantage], dtype=torch.float64)
        high, _ = clipped_token_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
        sym, _ = clipped_token_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
        assert high[0, token].item() == pytest.approx(expected_high)
        assert sym[0, token].item() == pytest.approx(expected_sym)
    live = logprobs.clone().requires_grad_(True)
    loss, stats = clipped_token_loss(live, old, torch.tensor([1.0], dtype=torch.float64), mask, clip_low=0.2, clip_high=0.28)
    loss[0, 0].backward()
    assert live.grad[0, 0].item() == pytest.approx(-1.25)  # d(-ratio)/d logp = -ratio: not clipped
    assert stats["clipfrac_high"].item() == 0 and stats["clipfrac_low"].item() == 0


def test_grpo_kl_term_is_trls_k3():
    # TRL: per_token_kl = exp(ref - logp) - (ref - logp) - 1, added as beta * per_token_kl to the loss.
    g = torch.Generator().manual_seed(6)
    logp, ref = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    trl = torch.exp(ref - logp) - (ref - logp) - 1
    assert torch.allclose(kl_per_token(logp, ref, "k3"), trl, atol=1e-12)


def test_random_group_sizes_and_tied_scores_against_the_loop():
    rng = random.Random(7)
    for _ in range(5):
        k, groups = rng.randint(2, 6), rng.randint(1, 4)
        scores = torch.tensor([rng.choice([0.0, 1.0, rng.random()]) for _ in range(k * groups)], dtype=torch.float64)
        for baseline in ("mean", "leave_one_out"):
            got = group_advantages(scores, k, baseline=baseline, scale="group")
            assert got.tolist() == pytest.approx(_loop_advantages(scores.tolist(), k, baseline, "group", 1e-4), abs=1e-9)
