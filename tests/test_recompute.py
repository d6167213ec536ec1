"""Gradient checkpointing (`cai.train.recompute`): the same losses and gradients for far fewer saved activations,
in eval mode too (the RL trainers' mode); passes without gradients, generation with its KV cache included, unchanged."""

from __future__ import annotations

import pytest
import torch


def _lora_model(tiny_model_dir, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # B starts at 0, which would make the adapters' gradients trivially equal
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_saved_bytes(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss of a forward with gradients, and the bytes of the tensors autograd keeps for its backward."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return loss, sum(storages.values())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recomputed_layers_give_the_same_gradients_for_fewer_saved_activations(tiny_model_dir, mode):
    from cai.train.recompute import recompute_layers

    ids = torch.randint(0, 200, (4, 48), generator=torch.Generator().manual_seed(1))
    results = []
    for recompute in (False, True):
        model = _lora_model(tiny_model_dir)
        getattr(model, mode)()
        if recompute:
            assert recompute_layers(model) == model.config.num_hidden_layers
        loss, saved = _loss_and_saved_bytes(model, ids)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, saved))
    (loss_kept, grads_kept, saved_kept), (loss_re, grads_re, saved_re) = results
    assert loss_re == pytest.approx(loss_kept, abs=1e-6)
    assert grads_kept.keys() == grads_re.keys() and len(grads_kept) > 0
    for name in grads_kept:
        assert torch.allclose(grads_re[name], grads_kept[name], atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in grads_re.values())
    # What the layers kept is gone; the embeddings, the head and the loss still keep theirs.
    assert saved_re < saved_kept / 3, (saved_re, saved_kept)


def test_passes_without_gradients_and_generation_are_unchanged(tiny_model_dir):
    from cai.train.recompute import recompute_layers

    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    plain, recomputed = _lora_model(tiny_model_dir).eval(), _lora_model(tiny_model_dir).eval()
    recompute_layers(recomputed)
    with torch.no_grad():
        want = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        got = recomputed.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


def test_a_forward_with_gradients_and_a_kv_cache_is_refused(tiny_model_dir):
    from cai.train.recompute import recompute_layers

    model = _lora_model(tiny_model_dir).eval()
    recompute_layers(model)
    ids = torch.randint(0, 200, (1, 6))
    with pytest.raises(RuntimeError, match="use_cache=False"):
        model(input_ids=ids, use_cache=True)


def test_a_model_without_checkpoint_units_is_refused_with_what_to_do():
    from cai.errors import ConfigError
    from cai.train.recompute import recompute_layers

    with pytest.raises(ConfigError, match="without --gradient-checkpointing"):
        recompute_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
