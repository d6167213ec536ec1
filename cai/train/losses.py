"""Training losses as pure functions of tensors: shapes in the signatures, equations in the docstrings.

Soft labels: `p_chosen` is the judge's probability that `chosen` is better (0.5 to 1 after
`cai generate prefs` orders each pair). Every loss below is the cross-entropy against that
probability; with p_chosen = 1 it is the usual hard-label loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1. values, mask: (B, T)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | prefix) for each position. logits: (B, T, V) predicting labels: (B, T) -> (B, T).

    Callers shift beforehand: logits[:, t] must be the prediction for labels[:, t].
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the assistant tokens only.

    logits: (B, T, V), input_ids: (B, T), loss_mask: (B, T) with 1 on tokens to learn.
    loss = - sum_t m_t log p(x_t | x_<t) / sum_t m_t, over t >= 1.
    """
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    return -masked_mean(logp, loss_mask[:, 1:])


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p over the response tokens of each sequence. -> (B,)"""
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (logp * loss_mask[:, 1:].to(logp.dtype)).sum(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-model loss. r_chosen, r_rejected, p_chosen: (B,).

    P(chosen > rejected) = sigmoid(r_c - r_r);
    loss = - [p log sigmoid(r_c - r_r) + (1 - p) log sigmoid(r_r - r_c)], mean over the batch.
    """
    margin = r_chosen - r_rejected
    if p_chosen is None:
        p_chosen = torch.ones_like(margin)
    return -(p_chosen * F.logsigmoid(margin) + (1 - p_chosen) * F.logsigmoid(-margin)).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, p_chosen: torch.Tensor | None = None, rpo_alpha: float = 0.0,
             chosen_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO with soft labels. Inputs: (B,) summed response log-probs; beta > 0.

    h = beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]
    loss = - [p log sigmoid(h) + (1 - p) log sigmoid(-h)]   (the label-weighted form; p = 1 is DPO)
    With rpo_alpha > 0 (RPO, Pang et al. 2024): + rpo_alpha * mean(-log pi(y_c) / chosen_tokens), the
    chosen answers' per-token NLL, which stops DPO from pushing both answers down at once.
    Returns the mean loss and the implicit rewards beta * (log pi - log ref) for logging.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    if p_chosen is None:
        p_chosen = torch.ones_like(h)
    loss = -(p_chosen * F.logsigmoid(h) + (1 - p_chosen) * F.logsigmoid(-h)).mean()
    metrics = {}
    if rpo_alpha > 0:
        if chosen_tokens is None:
            raise ValueError("rpo_alpha needs chosen_tokens, the number of response tokens of each chosen answer")
        nll = -(policy_chosen / chosen_tokens.clamp(min=1).to(policy_chosen.dtype)).mean()
        loss = loss + rpo_alpha * nll
        metrics["nll/chosen"] = nll.detach()
    metrics |= {
        "rewards/chosen": chosen_reward.detach().mean(),
        "rewards/rejected": rejected_reward.detach().mean(),
        "rewards/margins": h.detach().mean(),
        "rewards/accuracy": (h.detach() > 0).float().mean(),
    }
    return loss, metrics
