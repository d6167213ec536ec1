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
    rpo, m = dpo_loss(pc, pr, rc, rr, beta, rpo_alpha=0.5, chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([6]))
    assert math.isclose(rpo.item(), -math.log(sig) + 0.5 * 10 / 4, rel_tol=1e-6) and math.isclose(m["nll/preferred"].item(), 2.5)
    with pytest.raises(ValueError, match="rpo_alpha needs chosen_tokens and rejected_tokens"):
        dpo_loss(pc, pr, rc, rr, beta, rpo_alpha=0.5)


def test_rpo_nll_pools_the_preferred_sides_tokens():
    """RPO's NLL is pooled over tokens (TRL's cross-entropy over the batch's chosen tokens), and taken on the
    side the label prefers: chosen when p_chosen >= 0.5, rejected below (the row swapped with 1 - p is the
    same pair, so it gets the same loss)."""
    beta, alpha = 0.1, 0.5
    pc, pr = torch.tensor([-10.0, -3.0, -2.0]), torch.tensor([-12.0, -6.0, -1.0])
    rc, rr = torch.tensor([-11.0, -3.0, -2.0]), torch.tensor([-11.0, -5.0, -1.0])
    p = torch.tensor([0.9, 0.2, 0.5])
    tc, tr = torch.tensor([4, 1, 2]), torch.tensor([5, 2, 3])
    loss, m = dpo_loss(pc, pr, rc, rr, beta, p, rpo_alpha=alpha, chosen_tokens=tc, rejected_tokens=tr)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    hs = [beta * ((-10 + 11) - (-12 + 11)), beta * ((-3 + 3) - (-6 + 5)), beta * (0 - 0)]  # 0.2, 0.1, 0
    dpo = -sum(q * math.log(sig(h)) + (1 - q) * math.log(sig(-h)) for q, h in zip([0.9, 0.2, 0.5], hs)) / 3
    # preferred sides: chosen of row 1 (10 nats, 4 tokens), rejected of row 2 (6 nats, 2 tokens), chosen of row 3 (a tie: 2, 2)
    nll = (10 + 6 + 2) / (4 + 2 + 2)
    assert math.isclose(m["nll/preferred"].item(), nll, rel_tol=1e-6)
    assert math.isclose(loss.item(), dpo + alpha * nll, rel_tol=1e-6)
    swapped, _ = dpo_loss(pr[1:2], pc[1:2], rr[1:2], rc[1:2], beta, 1 - p[1:2], alpha, tr[1:2], tc[1:2])
    alone, _ = dpo_loss(pc[1:2], pr[1:2], rc[1:2], rr[1:2], beta, p[1:2], alpha, tc[1:2], tr[1:2])
    assert math.isclose(swapped.item(), alone.item(), rel_tol=1e-6)


def test_losses_split_into_shares_that_add_up_to_the_pooled_mean():
    """Given the whole step's counts, each part of a batch returns its share: the shares of any split (micro-
    batches, processes) add up to the loss of the batch at once, a token (pair) mean, not a mean of means."""
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 6, 5), torch.randint(0, 5, (3, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0]])
    whole = sft_loss(logits, ids, mask)
    n = float(mask[:, 1:].sum())
    parts = sft_loss(logits[:1], ids[:1], mask[:1], tokens_total=n) + sft_loss(logits[1:], ids[1:], mask[1:], tokens_total=n)
    assert math.isclose(parts.item(), whole.item(), rel_tol=1e-6)
    assert not math.isclose((sft_loss(logits[:1], ids[:1], mask[:1]) + sft_loss(logits[1:], ids[1:], mask[1:])).item() / 2,
                            whole.item(), rel_tol=1e-3)  # the mean of the two means weights the 1-token row like the 5-token one
    rc, rr, p = torch.randn(3), torch.randn(3), torch.tensor([0.9, 0.6, 1.0])
    whole = bradley_terry_loss(rc, rr, p)
    parts = bradley_terry_loss(rc[:1], rr[:1], p[:1], pairs_total=3) + bradley_terry_loss(rc[1:], rr[1:], p[1:], pairs_total=3)
    assert math.isclose(parts.item(), whole.item(), rel_tol=1e-6)
    pc, pr, refc, refr = -5 * torch.rand(3), -5 * torch.rand(3), -5 * torch.rand(3), -5 * torch.rand(3)
    tc, tr = torch.tensor([1, 7, 3]), torch.tensor([2, 2, 9])
    whole, wm = dpo_loss(pc, pr, refc, refr, 0.1, p, 1.0, tc, tr)
    a, am = dpo_loss(pc[:1], pr[:1], refc[:1], refr[:1], 0.1, p[:1], 1.0, tc[:1], tr[:1], pairs_total=3, nll_tokens_total=11)
    b, bm = dpo_loss(pc[1:], pr[1:], refc[1:], refr[1:], 0.1, p[1:], 1.0, tc[1:], tr[1:], pairs_total=3, nll_tokens_total=11)
    assert math.isclose((a + b).item(), whole.item(), rel_tol=1e-6)
    for k in wm:
        assert math.isclose((am[k] + bm[k]).item(), wm[k].item(), rel_tol=1e-6, abs_tol=1e-7), k


def _new_bytes_saved_for_backward(fn, logits: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for fn(logits)'s backward that are not logits' own storage."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(logits)
    own = logits.untyped_storage().data_ptr()
    return sum(t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr() != own)


def test_token_logprobs_equal_log_softmax_and_keep_no_copy_of_the_logits_for_the_backward():
    """log p from logit - logsumexp per sequence: the values and gradients of log_softmax + gather, without keeping a
    (B, T, V) log_softmax for the backward (the largest tensor of a training step)."""
    from cai.train.losses import token_logprobs
    from cai.train.rl.math import entropy_from_logits

    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 1000) * 4).requires_grad_(True)
    labels = torch.randint(-1, 1000, (3, 5))  # -1: padding, read as token 0
    want_logits = logits.detach().clone().requires_grad_(True)
    want = torch.log_softmax(want_logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    got = token_logprobs(logits, labels)
    assert torch.allclose(got, want, atol=1e-5)
    weights = torch.randn(3, 5)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert torch.allclose(logits.grad, want_logits.grad, atol=1e-6)
    full = logits.numel() * logits.element_size()
    assert _new_bytes_saved_for_backward(lambda x: token_logprobs(x, labels), logits) < full / 10
    assert _new_bytes_saved_for_backward(lambda x: torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)),
                                         logits) >= full  # what the check catches
    logp = torch.log_softmax(logits.detach(), -1)
    assert torch.allclose(entropy_from_logits(logits.detach()), -(logp.exp() * logp).sum(-1), atol=1e-5)
