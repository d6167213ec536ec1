"""The intervals of `cai eval` and `cai judge eval` (`cai.intervals`): Wilson's by hand, the bootstrap around a
mean, the paired change's interval and Newcombe's interval against published and root-found figures."""

from __future__ import annotations

import numpy as np
import pytest

from cai.intervals import change, mean, paired_rate_change, rate, wilson_interval


def test_wilson_interval_by_hand():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and high == pytest.approx(0.5962, abs=1e-4)


def test_rate_has_the_wilson_interval_and_mean_a_bootstrap_interval_around_it():
    r = rate([True] * 3 + [False] * 7)
    assert r.value == pytest.approx(0.3) and r.low == pytest.approx(0.1078, abs=1e-3) and r.high == pytest.approx(0.6032, abs=1e-3)
    m = mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert m.value == 4.5 and 2.5 < m.low < 4.5 < m.high < 6.5
    assert mean([3.0]).low is None and rate([]).value is None


def test_paired_change_is_claimed_only_when_its_interval_excludes_zero():
    same = change([1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0])
    assert (same.value, same.low, same.high, same.excludes_zero) == (0.0, 0.0, 0.0, False)
    up = change([0] * 20, [1] * 18 + [0] * 2)
    assert up.value == pytest.approx(0.9) and up.low > 0.7 and up.excludes_zero
    noisy = change([0, 1, 0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 1, 1, 1])
    assert noisy.low < 0 < noisy.high and not noisy.excludes_zero
    with pytest.raises(ValueError, match="same prompts"):
        change([1, 2], [1])


def test_paired_rate_change_is_newcombes_hybrid_score_interval():
    # Fagerland, Lydersen & Laake (2017), Table 8.x, Cavo et al. 2012: 59 both, 6 before only, 16 after only, 80 neither.
    # Their Newcombe square-and-add interval: -0.0621 (-0.1186 to -0.0046); here after minus before is +0.0621.
    before = [1] * 59 + [1] * 6 + [0] * 16 + [0] * 80
    after = [1] * 59 + [0] * 6 + [1] * 16 + [0] * 80
    c = paired_rate_change(after, before)  # the book's first column is the "after" here
    assert (c.value, c.low, c.high) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=5e-5)
    # Newcombe (1998) method 10 by its definition: Wilson limits found by root-finding, then square-and-add.
    from scipy.optimize import brentq

    def wilson(k, n):
        score = lambda p: (k / n - p) ** 2 - 1.959963984540054 ** 2 * p * (1 - p) / n
        return (0.0 if k == 0 else brentq(score, 1e-12, k / n)), (1.0 if k == n else brentq(score, k / n, 1 - 1e-12))

    e, f, g, h = 36, 12, 2, 0  # 50 pairs, 12 only after, 2 only before
    p1, p2, n = (e + f) / 50, (e + g) / 50, 50
    (l1, u1), (l2, u2) = wilson(e + f, n), wilson(e + g, n)
    phi = (e * h - f * g) / ((e + f) * (g + h) * (e + g) * (f + h)) ** 0.5  # negative here, so no continuity correction
    low = (p1 - p2) - ((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2) ** 0.5
    high = (p1 - p2) + ((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2) ** 0.5
    c = paired_rate_change([1] * 36 + [0] * 12 + [1] * 2 + [0] * 0, [1] * 36 + [1] * 12 + [0] * 2)
    assert (c.value, c.low, c.high) == pytest.approx((0.2, low, high), abs=1e-9)
    with pytest.raises(ValueError, match=r"0 or 1.*0.5"):
        paired_rate_change([0, 1], [0.5, 1])


def test_with_no_true_change_a_rate_is_called_moved_at_most_five_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, moved = 2000, 0
    for _ in range(trials):  # 24 prompts, each refused with its own probability, by both models alike
        p = rng.uniform(0.05, 0.95, size=24)
        moved += paired_rate_change(rng.random(24) < p, rng.random(24) < p).moved
    assert moved / trials <= 0.05 + 2 * (0.05 * 0.95 / trials) ** 0.5, moved
