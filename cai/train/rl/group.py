"""The arithmetic of group-baseline policy gradients (GRPO, Dr. GRPO, DAPO, RLOO) as pure functions.

A batch holds G prompts with K sampled answers each, the K answers of a prompt in adjacent rows
(B = G * K); `scores` (B,) holds one reward per answer; `mask` (B, T) is 1 on an answer's real tokens.
No value model: an answer's advantage is its score against the other answers to the same prompt,
and every token of the answer gets it.

Advantages (`group_advantages`), with r the scores of one group and mean, std over that group:
- GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean(r)) / (std(r) + eps), std with Bessel's
  correction (n - 1), as TRL's GRPOTrainer computes it (`nanstd`, scale_rewards="group", its default).
- batch scale: A_i = (r_i - mean(r)) / (std over the whole batch of the scores + eps): TRL's
  scale_rewards="batch", which cites "PPO Lite" (Liu et al. 2025, arXiv 2508.08221); REINFORCE++
  with a group baseline (Hu et al. 2025) normalises by the batch in the same spirit.
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): A_i = r_i - mean(r), no
  division, because dividing by a group's std up-weights prompts that are nearly always or never solved.
- RLOO (Ahmadian et al. 2024, "Back to basics"): A_i = r_i - mean of the other K-1 scores
  = K/(K-1) * (r_i - mean(r)); TRL's RLOOTrainer by default (normalize_advantages=False).

Loss aggregation (`aggregate_loss`), l the per-token loss and |o_i| answer i's token count:
- "sequence": (1/B) sum_i (1/|o_i|) sum_t l_it (GRPO paper; TRL loss_type="grpo"). Each answer
  weighs the same, so a long wrong answer is penalised less per token than a short one.
- "token": sum_it l_it / sum_i |o_i| (DAPO, Yu et al. 2025; TRL "dapo", whose count is global over
  processes and accumulation steps, and "bnpo", whose count is the local micro-batch's).
- "constant": sum_it l_it / (B * max_tokens) (Dr. GRPO; TRL "dr_grpo" with max_completion_length).
The normaliser is `loss_denominator`; a process holding part of a batch passes the whole batch's
(summed over processes) as `denominator=` so that the processes' shares add up to the batch's loss.

Per token (`clipped_token_loss`): -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) with
rho = pi / pi_old, PPO's clipped surrogate with DAPO's "clip-higher" (clip_high > clip_low lets
unlikely tokens gain probability faster; TRL's epsilon and epsilon_high).

KL to the reference: GRPO adds beta * k3 to each token's loss, with Schulman's k3 = exp(ref - logp) -
(ref - logp) - 1 (TRL's `beta` term), which is `cai.train.rl.math.kl_per_token(logprobs, ref_logprobs,
"k3")`. Differentiated as a loss on the policy's own samples, its gradient is in expectation that of
KL(ref || policy) per token. The alternative, as in PPO and TRL's RLOOTrainer, folds beta * sum_t k1
into each answer's score before the advantages; the trainer offers both.
"""

from __future__ import annotations

import torch

from cai.train.losses import masked_mean

BASELINES = ("mean", "leave_one_out")
SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sequence", "token", "constant")


def group_advantages(scores: torch.Tensor, k: int, *, baseline: str = "mean", scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """One advantage per answer from the scores of its group of `k` adjacent rows. scores: (B,) -> (B,).

    baseline "mean" subtracts the group's mean (GRPO), "leave_one_out" the mean of the other k-1 (RLOO);
    scale "group" divides by the group's std + eps, "batch" by the batch's std of the scores + eps,
    "none" leaves the difference as it is (Dr. GRPO; RLOO). Stds are unbiased (n - 1), as in TRL.
    """
    if baseline not in BASELINES:
        raise ValueError(f"group_advantages: baseline must be one of {BASELINES}, got {baseline!r}")
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    if scores.dim() != 1:
        raise ValueError(f"group_advantages: scores must be one score per answer, shape (B,), got {tuple(scores.shape)}")
    if k < 2:
        raise ValueError(f"group_advantages: k={k} answers per prompt; a group baseline needs k >= 2 "
                         "(with one answer there is no other to compare it with and every advantage is 0)")
    if len(scores) % k:
        raise ValueError(f"group_advantages: {len(scores)} scores do not split into groups of k={k} adjacent answers")
    if not torch.isfinite(scores).all():
        raise ValueError(f"group_advantages: scores must be finite, got {scores.tolist()}")
    grouped = scores.view(-1, k)  # (G, K)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if baseline == "leave_one_out":
        # r_i - (sum - r_i) / (k - 1) = k / (k - 1) * (r_i - mean)
        centred = centred * (k / (k - 1))
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (scores.std() + eps)
    return centred.reshape(-1)


def loss_denominator(mask: torch.Tensor, mode: str, *, max_tokens: int | None = None) -> torch.Tensor:
    """What `aggregate_loss` divides by for this batch: B ("sequence"), the number of real tokens
    ("token", at least 1), or B * max_tokens ("constant"). mask: (B, T) -> scalar.

    Several processes (or accumulation steps) sum theirs to get the whole batch's, and each passes
    that to `aggregate_loss(..., denominator=)`. Under DDP, which averages gradients over N processes,
    multiply the loss by N (TRL's "dapo" divides the global token count by the number of processes).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate_loss: mode must be one of {AGGREGATIONS}, got {mode!r}")
    rows = mask.shape[0]
    if mode == "sequence":
        return torch.tensor(float(rows), device=mask.device)
    if mode == "token":
        return mask.sum().to(torch.float32).clamp(min=1.0)  # an all-padding batch gives 0, not 0/0
    if max_tokens is None or max_tokens < 1:
        raise ValueError(f"aggregate_loss: mode 'constant' needs max_tokens >= 1 (the longest answer the "
                         f"sampler may produce), got {max_tokens!r}")
    if mask.shape[1] > max_tokens:
        raise ValueError(f"aggregate_loss: answers are {mask.shape[1]} tokens wide but max_tokens={max_tokens}")
    return torch.tensor(float(rows * max_tokens), device=mask.device)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, max_tokens: int | None = None,
                   denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """The batch's loss from per-token losses (B, T) under `mask` (B, T): see the module docstring.

    "sequence" sums each answer's token mean (an answer with no real token adds 0), "token" and
    "constant" sum every real token's loss; then it divides by `denominator`, by default this batch's
    `loss_denominator`.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"aggregate_loss: per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ")
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate_loss: mode must be one of {AGGREGATIONS}, got {mode!r}")
    if denominator is None:
        denominator = loss_denominator(mask, mode, max_tokens=max_tokens)
    elif float(denominator) <= 0:
        raise ValueError(f"aggregate_loss: denominator must be positive, got {float(denominator)}")
    mask = mask.to(per_token.dtype)
    masked = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
    if mode == "sequence":
        total = (masked.sum(1) / mask.sum(1).clamp(min=1.0)).sum()
    else:
        total = masked.sum()
    return total / denominator


def clipped_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       *, clip_low: float, clip_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A), 0 off the mask.

    logprobs, old_logprobs, mask: (B, T); advantages: (B,), one per answer. Returns the (B, T) loss
    and token means over the mask: clipfrac (tokens whose clipped term won, so they get no gradient),
    clipfrac_low / clipfrac_high (of those, A < 0 below 1 - clip_low / A > 0 above 1 + clip_high),
    approxkl (0.5 * (log rho)^2, as in `cai.train.rl.math.policy_loss`).
    """
    if clip_low <= 0 or clip_high <= 0 or clip_low >= 1:
        raise ValueError(f"clipped_token_loss: need 0 < clip_low < 1 and clip_high > 0, got {clip_low}, {clip_high}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"clipped_token_loss: advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    adv = advantages.unsqueeze(1)  # (B, 1): every token of an answer shares its advantage
    surrogate = ratio * adv
    clipped_surrogate = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(surrogate, clipped_surrogate)
    per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
    low = (ratio < 1.0 - clip_low) & (adv < 0)
    high = (ratio > 1.0 + clip_high) & (adv > 0)
    stats = {"clipfrac": masked_mean((low | high).float(), mask),
             "clipfrac_low": masked_mean(low.float(), mask),
             "clipfrac_high": masked_mean(high.float(), mask),
             "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask)}
    return per_token, stats
