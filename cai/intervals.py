"""95% intervals for the figures of `cai eval` and `cai judge eval`, and the paired tests that call a change.

A figure is an `Estimate`: Wilson's score interval for a rate (`rate`, `wilson_interval`), a percentile
bootstrap over prompts for a mean (`mean`, `bootstrap_interval`). A change between two models answering
the same prompts is paired (`Change`): for a 0/1 figure, Newcombe's score interval for paired rates, and
McNemar's exact test alone calls it moved (`paired_rate_change`; a percentile bootstrap on 24 prompts
called 4 one-way changes a change, where the exact p is 0.125); for a mean, the bootstrap over prompts
keeping both models' answers to each (`change`), moved when its interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054
"""The standard normal's 97.5% point: a two-sided 95% interval (1.96 moves the fourth decimal of published figures)."""


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% at the default z). `successes` may hold halves
    (a tie counted as half a success), which the score formula takes as it stands."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


N_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% interval (None when there are too few data to give one)."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


ALPHA = 0.05
"""A change is called moved when its two-sided test rejects at this level (the intervals are 1 - ALPHA)."""


@dataclass(frozen=True)
class Change(Estimate):
    """A paired change, after minus before on the same prompts, and how it was judged.

    `method` is "newcombe+mcnemar" for a 0/1 yardstick (Newcombe's interval, McNemar's exact p) or
    "bootstrap" for a mean (moved when the paired percentile interval excludes 0)."""

    method: str = "bootstrap"
    p_value: float | None = None

    @property
    def moved(self) -> bool:
        if self.p_value is not None:
            return self.p_value < ALPHA
        return self.excludes_zero


def rate(flags: Sequence[float]) -> Estimate:
    """A share with its Wilson interval; each flag is 0 or 1, or 0.5 for a tie (counted as half)."""
    n = len(flags)
    if n == 0:
        return Estimate(None, None, None, 0)
    k = sum(float(x) for x in flags)
    low, high = wilson_interval(k, n)
    return Estimate(k / n, low, high, n)


def paired_rate_change(before: Sequence[float], after: Sequence[float]) -> Change:
    """The change in a 0/1 rate between two models answering the same prompts: Newcombe's (1998)
    method 10 interval, and whether it moved by McNemar's exact test.

    The interval squares and adds the Wilson intervals of the two rates, less their correlation phi
    (Newcombe's form: AD - BC shrunk by n/2 toward 0 when positive). Its coverage is near 95% even on
    few prompts, where a percentile bootstrap is too narrow. The verdict is McNemar's exact test (the
    one-way changes as a Binomial(f + g, 1/2)): it never calls a change that the interval keeps 0 in,
    but on a handful of one-way changes the interval can exclude 0 while the test does not reject
    (5 of 24: p = 0.0625), and then the change is not called moved."""
    from scipy.stats import binomtest

    if len(before) != len(after):
        raise ValueError(f"paired change needs answers to the same prompts: {len(before)} vs {len(after)}")
    odd = [x for x in list(before) + list(after) if float(x) not in (0.0, 1.0)]
    if odd:
        raise ValueError(f"paired_rate_change takes 0 or 1 per answer, got {odd[0]!r}; use change() for a mean")
    n = len(before)
    if n == 0:
        return Change(None, None, None, 0, "newcombe+mcnemar")
    x, y = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    e, f, g, h = (int(v) for v in ((x & y).sum(), (~x & y).sum(), (x & ~y).sum(), (~x & ~y).sum()))  # both, up, down, neither
    p1, p2 = (e + f) / n, (e + g) / n  # after, before
    (l1, u1), (l2, u2) = wilson_interval(e + f, n), wilson_interval(e + g, n)
    margins = (e + f) * (g + h) * (e + g) * (f + h)
    ad_bc = e * h - f * g
    shrunk = ad_bc - n / 2 if ad_bc > n / 2 else (0.0 if ad_bc >= 0 else ad_bc)
    phi = shrunk / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    p_value = float(binomtest(f, f + g, 0.5).pvalue) if f + g else 1.0
    return Change(d, max(-1.0, low), min(1.0, high), n, "newcombe+mcnemar", p_value)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile 95% interval of statistic(indices) over resampled prompt indices."""
    if n < 2:
        return None, None
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(N_RESAMPLES)], dtype=float)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return None, None
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def mean(values: Sequence[float], *, seed: int = 0) -> Estimate:
    """A mean with its bootstrap interval."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return Estimate(None, None, None, 0)
    return Estimate(float(x.mean()), *bootstrap_interval(lambda i: x[i].mean(), len(x), seed), len(x))


def change(before: Sequence[float], after: Sequence[float], *, seed: int = 0) -> Change:
    """Mean of after minus before on the same prompts, with a paired bootstrap interval (prompts
    resampled, each prompt's two answers kept together). For a mean; a 0/1 rate takes paired_rate_change."""
    if len(before) != len(after):
        raise ValueError(f"paired change needs answers to the same prompts: {len(before)} vs {len(after)}")
    n = len(before)
    if n == 0:
        return Change(None, None, None, 0)
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return Change(float(d.mean()), *bootstrap_interval(lambda i: d[i].mean(), n, seed), n)


INTERVALS = ("95%: Wilson for rates, percentile bootstrap over prompts for means; changes paired on the same prompts: "
             "a rate's by Newcombe's score interval, called moved by McNemar's exact test at 5%, a mean's by the bootstrap")
"""How the table's intervals are made (eval.json and the report say it)."""
