"""Group-pairwise judge rewards (`cai.train.rl.pairwise`): the schedule, win rates and Bradley-Terry."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cai.train.rl.pairwise import (
    DEFAULT_MAX_PAIRS,
    DEFAULT_PRIOR,
    bradley_terry,
    group_rewards,
    mean_win_probability,
    pair_schedule,
)

THREE = [(0, 1), (1, 2), (0, 2)]
THREE_PROBS = [0.8, 0.7, 0.9]


def _connected(k: int, pairs: list[tuple[int, int]]) -> bool:
    reached, frontier = {0}, [0]
    while frontier:
        v = frontier.pop()
        for i, j in pairs:
            for a, b in ((i, j), (j, i)):
                if a == v and b not in reached:
                    reached.add(b)
                    frontier.append(b)
    return len(reached) == k


def test_all_pairs_up_to_the_cap():
    assert pair_schedule(2) == [(0, 1)]
    assert pair_schedule(6) == list(itertools.combinations(range(6), 2))  # 15 <= 16 pairs
    assert pair_schedule(6, max_pairs=15) == pair_schedule(6)
    assert len(pair_schedule(7)) == 16
    assert DEFAULT_MAX_PAIRS == 16
    assert pair_schedule(10, max_pairs=None) == list(itertools.combinations(range(10), 2))


@pytest.mark.parametrize("k", range(3, 14))
def test_above_the_cap_every_design_is_balanced_connected_and_distinct(k):
    for max_pairs in range(k - 1, k * (k - 1) // 2):
        for seed in (0, 1):
            pairs = pair_schedule(k, max_pairs=max_pairs, seed=seed)
            assert len(pairs) == max_pairs == len(set(pairs))
            assert all(0 <= i < j < k for i, j in pairs)
            degrees = Counter(v for pair in pairs for v in pair)
            assert set(degrees) == set(range(k))
            assert max(degrees.values()) - min(degrees.values()) <= 1, (k, max_pairs, seed, pairs)
            assert _connected(k, pairs), (k, max_pairs, seed, pairs)


def test_the_schedule_is_seeded_and_deterministic():
    assert pair_schedule(8, seed=3) == pair_schedule(8, seed=3)
    assert len({tuple(pair_schedule(8, seed=s)) for s in range(10)}) > 1
    assert len(pair_schedule(8)) == 16
    with pytest.raises(ValueError, match="at least k-1 = 7"):
        pair_schedule(8, max_pairs=6)
    with pytest.raises(ValueError, match="k >= 2"):
        pair_schedule(1)


def test_win_rate_by_hand():
    # 0: (0.8 + 0.9) / 2; 1: (0.2 + 0.7) / 2; 2: (0.3 + 0.1) / 2
    got = mean_win_probability(3, THREE, THREE_PROBS)
    assert got.tolist() == pytest.approx([0.85, 0.45, 0.2])


def test_bradley_terry_two_answers_is_the_logit_without_prior():
    for p in (0.8, 0.55, 0.1):
        s = bradley_terry(2, [(0, 1)], [p], prior=0.0)
        assert (s[0] - s[1]).item() == pytest.approx(math.log(p / (1 - p)), abs=1e-9)
        assert s.sum().item() == pytest.approx(0.0, abs=1e-12)


def _scipy_bradley_terry(k, pairs, probs, prior):
    def objective(s):
        total = 0.5 * prior * float(s @ s)
        for (i, j), p in zip(pairs, probs):
            margin = s[i] - s[j]
            total += p * np.logaddexp(0.0, -margin) + (1 - p) * np.logaddexp(0.0, margin)  # -log sigmoid
        return total

    result = minimize(objective, np.zeros(k), method="BFGS", options={"gtol": 1e-11})
    return result.x - result.x.mean()


@pytest.mark.parametrize("prior", [DEFAULT_PRIOR, 0.5, 0.0])
def test_bradley_terry_three_answers_against_scipy(prior):
    got = bradley_terry(3, THREE, THREE_PROBS, prior=prior)
    want = _scipy_bradley_terry(3, THREE, THREE_PROBS, prior)
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert got[0] > got[1] > got[2]
    assert got.sum().item() == pytest.approx(0.0, abs=1e-12)


def test_bradley_terry_on_a_capped_schedule_against_scipy():
    pairs = pair_schedule(9, max_pairs=14, seed=2)
    probs = torch.rand(len(pairs), generator=torch.Generator().manual_seed(8), dtype=torch.float64).tolist()
    got = bradley_terry(9, pairs, probs)
    assert got.tolist() == pytest.approx(_scipy_bradley_terry(9, pairs, probs, DEFAULT_PRIOR).tolist(), abs=1e-6)


def test_a_clean_sweep_stays_finite_with_the_prior():
    s = bradley_terry(3, THREE, [1.0, 1.0, 1.0])
    assert torch.isfinite(s).all() and s[0] > s[1] > s[2]
    # 2 answers, p = 1: the optimum solves prior * x = 1 - sigmoid(2x) for s = (x, -x); x ~ 1.957 at 0.01.
    x = bradley_terry(2, [(0, 1)], [1.0])[0].item()
    assert DEFAULT_PRIOR * x == pytest.approx(1 - 1 / (1 + math.exp(-2 * x)), abs=1e-9)
    with pytest.raises(ValueError, match="prior > 0"):
        bradley_terry(2, [(0, 1)], [1.0], prior=0.0)


@pytest.mark.parametrize("method", ["bt", "win_rate"])
def test_all_ties_give_equal_rewards(method):
    pairs = pair_schedule(5)
    rewards = group_rewards(5, pairs, torch.full((2, len(pairs)), 0.5), method=method)
    assert rewards.shape == (10,)
    assert torch.allclose(rewards, rewards[0].expand(10), atol=1e-12)


@pytest.mark.parametrize("method", ["bt", "win_rate"])
def test_relabelling_the_answers_relabels_the_rewards(method):
    pairs = pair_schedule(4)
    probs = [0.9, 0.6, 0.75, 0.3, 0.55, 0.2]
    base = group_rewards(4, pairs, torch.tensor([probs]), method=method)
    perm = [2, 0, 3, 1]  # answer a becomes answer perm[a]
    moved_pairs, moved_probs = [], []
    for (i, j), p in zip(pairs, probs):
        a, b = perm[i], perm[j]
        moved_pairs.append((min(a, b), max(a, b)))
        moved_probs.append(p if a < b else 1 - p)
    moved = group_rewards(4, moved_pairs, torch.tensor([moved_probs]), method=method)
    assert torch.allclose(moved[perm], base, atol=1e-9)


def test_group_rewards_keep_groups_in_adjacent_rows_and_the_order():
    probs = torch.tensor([THREE_PROBS, [1 - p for p in THREE_PROBS]])
    bt = group_rewards(3, THREE, probs, method="bt")
    assert torch.allclose(bt[:3], bradley_terry(3, THREE, THREE_PROBS))
    assert torch.allclose(bt[3:], -bt[:3], atol=1e-9)  # every verdict reversed: strengths negate
    win = group_rewards(3, THREE, probs, method="win_rate")
    assert win.tolist() == pytest.approx([0.85, 0.45, 0.2, 0.15, 0.55, 0.8])


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"answers \[2\] are in no pair"):
        mean_win_probability(3, [(0, 1)], [0.5])
    with pytest.raises(ValueError, match="unconnected"):
        bradley_terry(4, [(0, 1), (2, 3)], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bradley_terry(2, [(0, 1)], [1.5])
    with pytest.raises(ValueError, match="one probability per pair"):
        bradley_terry(3, THREE, [0.5])
    with pytest.raises(ValueError, match="method"):
        group_rewards(3, THREE, torch.tensor([THREE_PROBS]), method="elo")
