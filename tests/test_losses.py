"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cai.train.losses import bradley_terry_loss, dpo_loss, sequence_logprobs, sft_loss


def test_sft_loss_counts_only_masked_tokens():
    # Vocabulary of 2, uniform logits everywhere but one position: loss is -log p of the masked targets.
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([math.log(3.0), 0.0])  # p(token 0) = 3/4 at position 1 -> predicts input_ids[2]
    input_ids = torch.tensor([[1, 1, 0, 1]])
    mask = torch.tensor([[0, 0, 1, 1]])  # learn tokens 2 and 3 (predicted at positions 1 and 2)
    expected = -(math.log(3 / 4) + math.log(1 / 2)) / 2
    assert math.isclose(sft_loss(logits, input_ids, mask).item(), expected, rel_tol=1e-6)
    assert math.isclose(sequence_logprobs(logits, input_ids, mask).item(), math.log(3 / 4) + math.log(1 / 2), rel_tol=1e-6)


def test_bradley_terry_soft_and_hard_labels():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    hard = -(math.log(sig(1.0)) + math.log(sig(0.0))) / 2
    assert math.isclose(bradley_terry_loss(rc, rr).item(), hard, rel_tol=1e-6)
    p = torch.tensor([0.75, 0.5])
    soft = -((0.75 * math.log(sig(1.0)) + 0.25 * math.log(sig(-1.0))) + math.log(sig(0.0))) / 2
    assert math.isclose(bradley_terry_loss(rc, rr, p).item(), soft, rel_tol=1e-6)
    # A label of 0.5 has its minimum at margin 0: the gradient there vanishes.
    m = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(m, torch.zeros(1), torch.tensor([0.5])).backward()
    assert abs(m.grad.item()) < 1e-7


def test_dpo_loss_and_metrics_by_hand():
    beta = 0.1
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta, torch.tensor([0.9]))
    h = beta * ((-10 + 11) - (-12 + 11))  # 0.2
    sig = 1 / (1 + math.exp(-h))
    expected = -(0.9 * math.log(sig) + 0.1 * math.log(1 - sig))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(m["rewards/chosen"].item(), 0.1, rel_tol=1e-6)
    assert math.isclose(m["rewards/rejected"].item(), -0.1, rel_tol=1e-6)
    assert math.isclose(m["rewards/margins"].item(), 0.2, rel_tol=1e-6) and m["rewards/accuracy"].item() == 1.0
    hard, _ = dpo_loss(pc, pr, rc, rr, beta)
    assert math.isclose(hard.item(), -math.log(sig), rel_tol=1e-6)
    # RPO: the chosen answer's per-token NLL (10 nats over 4 tokens), weighted, on top of the DPO loss.
    rpo, m = dpo_loss(pc, pr, rc, rr, beta, rpo_alpha=0.5, chosen_tokens=torch.tensor([4]))
    assert math.isclose(rpo.item(), -math.log(sig) + 0.5 * 10 / 4, rel_tol=1e-6) and math.isclose(m["nll/chosen"].item(), 2.5)
    with pytest.raises(ValueError, match="rpo_alpha needs chosen_tokens"):
        dpo_loss(pc, pr, rc, rr, beta, rpo_alpha=0.5)
