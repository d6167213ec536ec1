"""Training losses as pure functions of tensors: shapes in the signatures, equations in the docstrings.

Soft labels: `p_chosen` is the judge's probability that `chosen` is better (0.5 to 1 after
`cai generate prefs` orders each pair). Every loss below is the cross-entropy against that
probability; with p_chosen = 1 it is the usual hard-label loss.

Shares: each loss is a sum over its tokens (pairs) divided by a count that defaults to the batch's own.
Passed the count of a whole optimiser step (all its micro-batches, all processes), it returns this part's
share, and the shares of any split add up to the step's mean over all its tokens (pairs) at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1. values, mask: (B, T)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | prefix) for each position, in float32. logits: (B, T, V) predicting labels: (B, T) -> (B, T).

    Callers shift beforehand: logits[:, t] must be the prediction for labels[:, t]. A label below 0 (padding) reads
    token 0. The values and gradients of log_softmax + gather, one sequence at a time (`_TokenLogprobs`).
    """
    return _TokenLogprobs.apply(logits, labels.clamp(min=0))


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax + gather without keeping a (B, T, V) log_softmax for the backward: the largest tensor of a training
    step (8 sequences x 2,048 tokens x a 128k vocabulary is 8 GiB in float32), as TRL's selective_log_softmax avoids.

    Forward: each sequence's log_softmax in turn, keeping the picked log p and the normaliser logsumexp per position.
    Backward: d log p[label] / d logit = onehot(label) - softmax, the softmax exp(logit - logsumexp) made again one
    sequence at a time. (logsumexp's own autograd does the same in memory but took 2-3 times as long on CPU.)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        picked = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        norm = torch.empty_like(picked)
        for i, row in enumerate(logits):
            row = row.float()
            logp = torch.log_softmax(row, dim=-1)
            picked[i] = logp.gather(-1, labels[i].unsqueeze(-1)).squeeze(-1)
            norm[i] = row[:, 0] - logp[:, 0]  # logsumexp of the row: logit - log p of any token
        ctx.save_for_backward(logits, labels, norm)
        return picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, labels, norm = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for i, row in enumerate(logits):
            g = grad[i].float().unsqueeze(-1)
            d = row.float().sub(norm[i].unsqueeze(-1)).exp_().mul_(-g)  # - softmax * grad
            grad_logits[i] = d.scatter_add_(-1, labels[i].unsqueeze(-1), g)  # + grad at the label
        return grad_logits, None


def _share(total: torch.Tensor, count: torch.Tensor | float | None, own: torch.Tensor) -> torch.Tensor:
    """total / count, with this batch's own count when none is given (never below 1: an empty mask gives 0)."""
    n = own if count is None else torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / n.to(device=total.device, dtype=total.dtype).clamp(min=1.0)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             tokens_total: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the assistant tokens only.

    logits: (B, T, V), input_ids: (B, T), loss_mask: (B, T) with 1 on tokens to learn.
    loss = - sum_t m_t log p(x_t | x_<t) / N, over t >= 1, N = sum_t m_t (or `tokens_total`: a share).
    """
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    mask = loss_mask[:, 1:].to(logp.dtype)
    return _share(-(logp * mask).sum(), tokens_total, mask.sum())


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p over the response tokens of each sequence. -> (B,)"""
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (logp * loss_mask[:, 1:].to(logp.dtype)).sum(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor | None = None,
                       pairs_total: float | None = None) -> torch.Tensor:
    """Reward-model loss. r_chosen, r_rejected, p_chosen: (B,).

    P(chosen > rejected) = sigmoid(r_c - r_r);
    loss = - sum_i [p log sigmoid(r_c - r_r) + (1 - p) log sigmoid(r_r - r_c)] / B (or `pairs_total`: a share).
    """
    margin = r_chosen - r_rejected
    if p_chosen is None:
        p_chosen = torch.ones_like(margin)
    total = -(p_chosen * F.logsigmoid(margin) + (1 - p_chosen) * F.logsigmoid(-margin)).sum()
    return _share(total, pairs_total, torch.tensor(float(len(margin))))


def preferred_tokens(p_chosen: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """Response tokens of each pair's preferred side (RPO's NLL target): chosen where p_chosen >= 0.5. -> (B,)"""
    return torch.where(p_chosen >= 0.5, chosen_tokens, rejected_tokens)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, p_chosen: torch.Tensor | None = None, rpo_alpha: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             pairs_total: float | None = None, nll_tokens_total: float | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO with soft labels. Inputs: (B,) summed response log-probs; beta > 0.

    h = beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]
    loss = - sum_i [p log sigmoid(h) + (1 - p) log sigmoid(-h)] / B   (label-weighted; p = 1 is DPO)
    With rpo_alpha > 0 (RPO, Pang et al. 2024): + rpo_alpha * NLL, the preferred answers' negative
    log-likelihood pooled over their tokens (as TRL's cross-entropy over the batch's chosen tokens):
    NLL = - sum_i log pi(y_i*) / sum_i |y_i*|, y_i* = y_c where p >= 0.5, else y_r (the answer the label
    prefers: swapping a pair's sides and p -> 1 - p leaves the loss unchanged). chosen_tokens and
    rejected_tokens: (B,) response lengths. pairs_total / nll_tokens_total replace B and sum_i |y_i*| to
    return a share of a whole step (see the module docstring); the metrics are shares in the same way.
    Returns the loss and the implicit rewards beta * (log pi - log ref) for logging.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    if p_chosen is None:
        p_chosen = torch.ones_like(h)
    pairs = torch.tensor(float(len(h)))

    def mean(x: torch.Tensor) -> torch.Tensor:  # over pairs, or a share of the step's pairs
        return _share(x.sum(), pairs_total, pairs)

    loss = mean(-(p_chosen * F.logsigmoid(h) + (1 - p_chosen) * F.logsigmoid(-h)))
    metrics = {}
    if rpo_alpha > 0:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("rpo_alpha needs chosen_tokens and rejected_tokens, the response lengths of each pair's two answers")
        preferred = p_chosen >= 0.5
        logp = torch.where(preferred, policy_chosen, policy_rejected)
        tokens = preferred_tokens(p_chosen, chosen_tokens, rejected_tokens)
        nll = _share(-logp.sum(), nll_tokens_total, tokens.sum())
        loss = loss + rpo_alpha * nll
        metrics["nll/preferred"] = nll.detach()
    metrics |= {
        "rewards/chosen": mean(chosen_reward.detach()),
        "rewards/rejected": mean(rejected_reward.detach()),
        "rewards/margins": mean(h.detach()),
        "rewards/accuracy": mean((h.detach() > 0).float()),
    }
    return loss, metrics
