"""Rewards from a judge's pairwise comparisons inside each group of K answers to one prompt.

The judge sees pairs (i, j) of a group's answers, in both orders to cancel its position bias, and
returns p = p(i beats j) in [0, 1]; an answer's reward is its strength within its group:
- "win_rate": the mean over its pairs of p(it wins), in [0, 1].
- "bt": Bradley-Terry strengths s, the maximiser of
      sum over pairs of [p log sigmoid(s_i - s_j) + (1 - p) log sigmoid(s_j - s_i)] - prior / 2 * |s|^2,
  the soft-label likelihood with a Gaussian prior N(0, 1 / prior) on each strength. The prior keeps an
  answer that wins every comparison finite (DEFAULT_PRIOR = 0.01, a N(0, 10^2) prior: two answers
  with p = 1 end 3.9 logits apart, and a single p = 0.8 gives 1.34 instead of logit(0.8) = 1.39);
  with prior = 0 every p must lie strictly inside (0, 1). The strengths have mean 0 either way.
Both are on a scale that the group baseline then removes (`cai.train.rl.group.group_advantages`).

Which pairs: all K(K-1)/2 while that is at most `max_pairs` (DEFAULT_MAX_PAIRS = 16 covers K <= 6);
above, `pair_schedule` picks `max_pairs` pairs in which every answer has as equal a number of pairs as
possible, connected so that the Bradley-Terry strengths are identifiable, with answers relabelled by
a seeded shuffle. Each pair costs two judge calls (both orders).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import torch

DEFAULT_MAX_PAIRS = 16
DEFAULT_PRIOR = 0.01
METHODS = ("bt", "win_rate")

Pair = tuple[int, int]


def pair_schedule(k: int, *, max_pairs: int | None = DEFAULT_MAX_PAIRS, seed: int = 0) -> list[Pair]:
    """The pairs (i < j) of answers 0..k-1 the judge compares, sorted; the same for the same arguments.

    All pairs when k(k-1)/2 <= max_pairs (or max_pairs is None); otherwise max_pairs of them, every
    answer in floor or ceil of 2 * max_pairs / k pairs, all answers connected.
    """
    if k < 2:
        raise ValueError(f"pair_schedule: k={k} answers per prompt; comparing needs k >= 2")
    every = list(itertools.combinations(range(k), 2))
    if max_pairs is None or len(every) <= max_pairs:
        return every
    if max_pairs < k - 1:
        raise ValueError(f"pair_schedule: max_pairs={max_pairs} cannot connect k={k} answers; "
                         f"raise it to at least k-1 = {k - 1}")
    relabel = list(range(k))
    random.Random(seed).shuffle(relabel)
    return sorted((min(relabel[a], relabel[b]), max(relabel[a], relabel[b])) for a, b in _balanced_graph(k, max_pairs))


def _balanced_graph(k: int, edges: int) -> list[Pair]:
    """A connected graph on k vertices with `edges` edges (k-1 <= edges < k(k-1)/2), degrees within 1 of each other."""
    if edges == k - 1:
        return [(i, i + 1) for i in range(k - 1)]  # the only tree with degrees 1 and 2: a path
    low, high_count = divmod(2 * edges, k)
    remaining = {v: low + (v < high_count) for v in range(k)}
    graph: set[Pair] = set()
    # Havel-Hakimi: a degree sequence whose values differ by at most 1 and sum to an even number is
    # graphical, and joining the largest remaining degree to the next largest ones realises it.
    while any(remaining.values()):
        v = max(remaining, key=lambda u: (remaining[u], -u))
        targets = sorted((u for u in remaining if u != v), key=lambda u: (-remaining[u], u))[:remaining[v]]
        for u in targets:
            graph.add((min(u, v), max(u, v)))
            remaining[u] -= 1
        remaining[v] = 0
    # Merge components by 2-switches, which keep every degree: swap an edge on a cycle of one component
    # (every degree is >= 2 here, so each component has one) and any edge of another for two edges across.
    while len(parts := _components(k, graph)) > 1:
        first, second = parts[0], parts[1]
        a1, a2 = next(e for e in sorted(graph) if e[0] in first and len(_components(k, graph - {e})) == len(parts))
        b1, b2 = next(e for e in sorted(graph) if e[0] in second)
        graph -= {(a1, a2), (b1, b2)}
        graph |= {(min(a1, b1), max(a1, b1)), (min(a2, b2), max(a2, b2))}
    return sorted(graph)


def _components(k: int, pairs: Sequence[Pair] | set[Pair]) -> list[set[int]]:
    """The connected components of the graph on 0..k-1 with these pairs as edges, by smallest member."""
    neighbours: dict[int, set[int]] = {v: set() for v in range(k)}
    for i, j in pairs:
        neighbours[i].add(j)
        neighbours[j].add(i)
    parts, seen = [], set()
    for start in range(k):
        if start in seen:
            continue
        part, frontier = {start}, [start]
        while frontier:
            for u in neighbours[frontier.pop()] - part:
                part.add(u)
                frontier.append(u)
        seen |= part
        parts.append(part)
    return parts


def _checked(k: int, pairs: Sequence[Pair], probs: torch.Tensor | Sequence[float], who: str) -> torch.Tensor:
    """probs as float64 (P,) after checking the pairs and probabilities; every answer must be in a pair."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if probs.shape != (len(pairs),):
        raise ValueError(f"{who}: one probability per pair expected, {len(pairs)} pairs but probs of shape {tuple(probs.shape)}")
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError(f"{who}: probabilities must lie in [0, 1], got {probs.tolist()}")
    for i, j in pairs:
        if not (0 <= i < k and 0 <= j < k and i != j):
            raise ValueError(f"{who}: pair {(i, j)} is not two different answers among 0..{k - 1}")
    missing = set(range(k)) - {v for pair in pairs for v in pair}
    if missing:
        raise ValueError(f"{who}: answers {sorted(missing)} are in no pair; every answer needs a comparison")
    return probs


def mean_win_probability(k: int, pairs: Sequence[Pair], probs: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Each answer's mean p(win) over the pairs it is in. probs[n] = p(pairs[n][0] beats pairs[n][1]). -> (k,) float64."""
    probs = _checked(k, pairs, probs, "mean_win_probability")
    wins = torch.zeros(k, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.float64)
    for (i, j), p in zip(pairs, probs):
        wins[i] += p
        wins[j] += 1 - p
        counts[i] += 1
        counts[j] += 1
    return wins / counts


def bradley_terry(k: int, pairs: Sequence[Pair], probs: torch.Tensor | Sequence[float], *,
                  prior: float = DEFAULT_PRIOR) -> torch.Tensor:
    """Bradley-Terry strengths (k,) float64, mean 0, of the soft labels probs[n] = p(pairs[n][0] beats pairs[n][1]).

    Maximises the penalised likelihood in the module docstring by damped Newton steps in float64
    to a gradient below 1e-10. The pairs must connect all k answers.
    """
    probs = _checked(k, pairs, probs, "bradley_terry")
    if prior < 0:
        raise ValueError(f"bradley_terry: prior must be >= 0, got {prior}")
    if len(_components(k, pairs)) > 1:
        raise ValueError(f"bradley_terry: the pairs {list(pairs)} leave the answers in unconnected sets; "
                         "strengths across them are not identifiable")
    if prior == 0 and not ((probs > 0) & (probs < 1)).all():
        raise ValueError("bradley_terry: with prior=0 a probability of exactly 0 or 1 sends a strength to infinity; "
                         "use prior > 0")
    first = torch.tensor([i for i, _ in pairs])
    second = torch.tensor([j for _, j in pairs])
    incidence = torch.zeros(len(pairs), k, dtype=torch.float64)  # row n: +1 at pairs[n][0], -1 at pairs[n][1]
    incidence[torch.arange(len(pairs)), first] = 1.0
    incidence[torch.arange(len(pairs)), second] = -1.0

    def objective(s: torch.Tensor) -> torch.Tensor:
        margin = incidence @ s
        nll = -(probs * torch.nn.functional.logsigmoid(margin) + (1 - probs) * torch.nn.functional.logsigmoid(-margin))
        return nll.sum() + 0.5 * prior * (s @ s)

    # The objective is unchanged by adding a constant to every s when prior = 0; 11^T/k fills that one
    # flat direction of the Hessian. From s = 0 every gradient sums to 0, so every step keeps sum(s) = 0.
    flat = torch.full((k, k), 1.0 / k, dtype=torch.float64)
    s = torch.zeros(k, dtype=torch.float64)
    for _ in range(100):
        win = torch.sigmoid(incidence @ s)
        gradient = incidence.T @ (win - probs) + prior * s
        if gradient.abs().max() < 1e-10:
            break
        hessian = incidence.T @ (incidence * (win * (1 - win)).unsqueeze(1)) + prior * torch.eye(k, dtype=torch.float64)
        step = torch.linalg.solve(hessian + flat, -gradient)
        size, current = 1.0, objective(s)
        while objective(s + size * step) > current and size > 1e-8:
            size /= 2
        s = s + size * step
    else:
        raise ArithmeticError(f"bradley_terry: Newton did not converge in 100 steps for pairs {list(pairs)}, "
                              f"probs {probs.tolist()}, prior {prior}")
    return s


def group_rewards(k: int, pairs: Sequence[Pair], probs: torch.Tensor, *, method: str = "bt",
                  prior: float = DEFAULT_PRIOR) -> torch.Tensor:
    """Rewards (G * K,) float64 for G groups of k answers, groups in adjacent rows as `group_advantages` expects.

    probs: (G, P), probs[g, n] = p(answer pairs[n][0] of group g beats answer pairs[n][1]); the same
    pairs for every group. method "bt" gives `bradley_terry` strengths, "win_rate" `mean_win_probability`.
    """
    if method not in METHODS:
        raise ValueError(f"group_rewards: method must be one of {METHODS}, got {method!r}")
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if probs.dim() != 2:
        raise ValueError(f"group_rewards: probs must be (groups, pairs), got shape {tuple(probs.shape)}")
    if method == "bt":
        rewards = [bradley_terry(k, pairs, row, prior=prior) for row in probs]
    else:
        rewards = [mean_win_probability(k, pairs, row) for row in probs]
    return torch.cat(rewards)
