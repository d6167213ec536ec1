"""The arithmetic online RL algorithms share, as pure functions: masked statistics and whitening, the
per-token KL estimate, the clipped policy loss, entropy; and the two KL controllers. What only PPO uses
(GAE, the clipped value loss) is in `cai.train.rl.ppo`.

Conventions: a batch holds B responses padded to T tokens; `mask` (B, T) is 1 on the response's
real tokens (up to and including EOS) and 0 after. Every function ignores masked-out positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.train.losses import masked_mean


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked positions. values, mask: (B, T)."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions come back as 0. (B, T) -> (B, T)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy. (B, T) -> (B, T).

    k1 = log p - log q (unbiased, can be negative per token); k3 = (r - 1) - log r with
    r = q / p (always >= 0, lower variance). See Schulman, "Approximating KL divergence".
    Both are unbiased as *value* estimates of the KL. As a reward penalty (what PPO folds into the
    rewards) k3's gradient is biased: E_p[k3 * grad log p] = grad KL(p||q) - grad KL(q||p), so k1
    is the default and k3 is for those who want its lower variance knowingly.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator: expected 'k1' or 'k3', got {estimator!r}")


def kl_penalised_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL_t on every response token, plus the score on the last one.

    scores: (B,), kl: (B, T), mask: (B, T) -> rewards (B, T), zero where mask is 0.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of each response's final real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = pi/pi_old. All (B, T)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask)}
    return loss, stats


def at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits in float32 divided by the sampling temperature: the same tensor at temperature 1 in float32, a new
    (B, T, V) one otherwise (drop the model's own then, or both stay alive through the backward)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution. (B, T, V) -> (B, T). One sequence at a time: the whole
    batch's log_softmax and its exp would be two more (B, T, V) tensors at once."""
    def one(row: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(row.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    return torch.stack([one(row) for row in logits])


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the measured KL approaches `target`.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon).
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
