"""Sampling rollouts with transformers' generate, keeping what the update needs from the sampling passes.

While `generate` runs, hooks read each decoding step: one on the LM head (its input is the last
hidden state) and two on the causal LM's forward (its `input_ids` are the tokens sampled at the step
before; its output the logits generate samples from). From them come, for every response position,
the value head's prediction (when the policy has one) and the log-probability of the token that was sampled. The logits are the
forward's, not the head's: Granite divides the head's output by `logits_scaling`, Gemma-2 soft-caps
it, Cohere multiplies it by `logit_scale`, and the update and the reference see the forward's. These
are exactly what a second forward pass over query + response would compute (up to the arithmetic of
the KV cache), so the trainer skips that pass: for a small PPO model it is a tenth of an iteration.

Only one step's log-softmax (batch x vocabulary) is held at a time, so memory does not grow with the
response length. If the hooks do not see the steps they expect (a model whose generate calls its
forward another way), `sample` returns None for the statistics, with a warning, and the trainer
falls back to the forward pass.

With `merged=True` the LoRA adapter is merged into a temporary copy of each adapted weight for the
duration of the sampling (`merged_adapter`), so each decoding step is one matmul per layer instead
of three plus peft's Python: 15% of SmolLM2's rollout on CPU. The trained weights are never touched
(peft's own merge/unmerge adds and subtracts in place, which does not give the weights back bit for
bit); the copies cost one adapted layer's worth of memory each, freed when sampling ends. Under bf16
autocast, or with bf16 base weights, nothing is merged: W + BA would meet the matmul in bf16, and an
adapter small next to W (as early in training) would be partly rounded away, so the rollouts would
come from another policy than the one the update trains.

Sampling itself does not draw from torch's random generator: `SeededSampler` picks each token by
inverse-CDF sampling from the softmax at the sampling temperature, with the uniform number a hash of
(seed, the row's key, the step). A row's draws therefore do not depend on which other rows share its
batch, on the device or on how many processes split the batch: training across processes samples exactly
the responses one process would, and a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessorList

from cai.seeded_sampling import SeededSampler

logger = logging.getLogger(__name__)


class _StepRecorder:
    def __init__(self, value_head: torch.nn.Module | None, temperature: float):
        self.value_head = value_head
        self.temperature = temperature
        self.values: list[torch.Tensor] = []  # (B,) per step, with a value head
        self.logprobs: list[torch.Tensor] = []  # (B,) per step but the last, gathered when its token is known
        self.tokens: list[torch.Tensor] = []  # the tokens the logprobs were gathered for, to check against the output
        self.pending: torch.Tensor | None = None  # (B, V) log-softmax of the last step, waiting for its sampled token
        self.broken = False  # a step came without input_ids or logits: the statistics cannot be trusted

    def on_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.pending is not None:
            if input_ids is None:
                self.broken = True
            else:
                token = input_ids[:, -1]
                self.logprobs.append(self.pending.gather(1, token.unsqueeze(1)).squeeze(1))
                self.tokens.append(token)
            self.pending = None

    def on_head(self, module, args, output):
        self.values.append(self.value_head(args[0][:, -1]).squeeze(-1).float())

    def on_output(self, module, args, kwargs, output):
        # The causal LM's logits, after whatever its forward does to the head's output (scaling, soft-capping).
        logits = getattr(output, "logits", None)
        if logits is None:
            self.broken = True
            return
        logits = logits[:, -1] if logits.dim() == 3 else logits  # (B, V)
        self.pending = torch.log_softmax(logits.float() / self.temperature, dim=-1)

    def finish(self, generated: torch.Tensor, synced: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(log-probs, values), each (B, n) for the n generated tokens (values None without a value head), or
        None when the steps do not line up.

        `synced`: generate went on stepping after these rows ended, until every process's had (FSDP); the
        steps past the n-th are dropped."""
        n = generated.shape[1]
        if self.broken or n == 0:
            return None
        if synced and len(self.tokens) + (self.pending is not None) > n:
            self.values, self.logprobs, self.tokens, self.pending = self.values[:n], self.logprobs[:n], self.tokens[:n], None
        if self.pending is not None and len(self.logprobs) == n - 1:
            self.logprobs.append(self.pending.gather(1, generated[:, -1:]).squeeze(1))
            self.tokens.append(generated[:, -1])
        if self.value_head is not None and len(self.values) != n:
            return None
        if len(self.logprobs) != n or not torch.equal(torch.stack(self.tokens, 1), generated):
            return None
        return torch.stack(self.logprobs, 1), torch.stack(self.values, 1) if self.value_head is not None else None


def _mergeable(layer) -> bool:
    """A plain LoRA layer on a Linear or Embedding: its adapter is exactly `get_delta_weight` added to the weight."""
    from peft.tuners.lora.layer import Embedding, Linear

    return (type(layer) in (Linear, Embedding) and isinstance(layer.base_layer, (torch.nn.Linear, torch.nn.Embedding))
            and not layer.merged and not any(a in layer.lora_variant or layer.lora_bias.get(a) for a in layer.active_adapters))


def _merges_exactly(weight: torch.Tensor) -> bool:
    """Whether W + BA reaches the matmul in float32: a float32 weight and no autocast on its device. In bf16
    the sum is rounded to W's precision, where a delta under half an ulp of W vanishes."""
    return weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type)


def _merged_weight(layer, weight: torch.Tensor) -> torch.Tensor:
    """A new tensor W + sum of the active adapters' deltas; W itself is not written."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A or a in layer.lora_embedding_A]
    if isinstance(layer.base_layer, torch.nn.Linear) and not layer.fan_in_fan_out and len(adapters) == 1:
        # W + s * B @ A in one pass, with no (out, in) temporary for the delta.
        a = adapters[0]
        lora_b = layer.lora_B[a].weight
        return torch.addmm(weight.to(lora_b.dtype), lora_b, layer.lora_A[a].weight, alpha=layer.scaling[a]).to(weight.dtype)
    return (weight + sum(layer.get_delta_weight(a) for a in adapters)).to(weight.dtype)


@contextlib.contextmanager
def merged_adapter(lm) -> Iterator[bool]:
    """Inside: every adapted layer runs W + delta (a fresh tensor) with its adapter switched off. Yields True.

    The original weight Parameters are put back on exit, untouched. Yields False and changes nothing
    when `lm` is not a peft model, has a layer whose adapter is not a plain weight delta (DoRA, LoRA
    bias, quantised base layers), or would run the merged weight in less than float32 (a base weight
    not float32, or autocast on): the caller then samples with the adapter as it is.
    """
    from peft.tuners.lora import LoraLayer

    from cai.train.adapters import adapter_disabled

    layers = [m for m in lm.modules() if isinstance(m, LoraLayer)] if hasattr(lm, "disable_adapter") else []
    if not layers or not all(_mergeable(m) for m in layers) or not all(_merges_exactly(m.base_layer.weight) for m in layers):
        yield False
        return
    originals = []
    try:
        with torch.no_grad(), adapter_disabled(lm):
            for layer in layers:
                base, weight = layer.base_layer, layer.base_layer.weight
                originals.append((base, weight))
                base.weight = torch.nn.Parameter(_merged_weight(layer, weight), requires_grad=False)
            yield True
    finally:
        for base, weight in originals:
            base.weight = weight


def sample(policy, query: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int, temperature: float, stop_ids: list[int],
           pad_id: int, seed: int, row_keys: torch.Tensor | None = None, merged: bool = False,
           cache: str = "dynamic", synced: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Sample responses for left-padded `query` (B, Tq) with the policy's adapter on (merged into a copy of the
    weights while sampling when `merged`).

    Row r's tokens are a function of (seed, row_keys[r], the policy, its query) only (`SeededSampler`);
    `row_keys` defaults to 0..B-1. The trainer passes each row's position in the whole iteration's batch.
    `cache="static"` decodes with transformers' preallocated KV cache (compiled on CUDA by generate).
    `synced`: every process of the launch calls this at once and their models' forward passes are
    collectives (FSDP), so generate steps until all processes' rows have ended (its `synced_gpus`).

    A row ends at the first of `stop_ids` (`cai.models.stop_token_ids`, as vLLM rollouts stop).
    Returns the generated tokens (B, n), n <= max_new_tokens (generate stops once every row has
    ended; rows that ended earlier are padded), and the log-probs (at `temperature`) and values of
    those tokens, (B, n) each (values None when the policy has no value head), or None when they
    could not be recorded.
    """
    lm = policy.lm
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    recorder = _StepRecorder(policy.value_head, temperature)
    hooks = [base.register_forward_pre_hook(recorder.on_forward, with_kwargs=True),
             base.register_forward_hook(recorder.on_output, with_kwargs=True)]
    if policy.value_head is not None:
        hooks.append(base.get_output_embeddings().register_forward_hook(recorder.on_head))
    # Plain sampling at `temperature` (SeededSampler inside greedy search), whatever the model's
    # generation_config.json says: a repetition penalty, top-k or min-p there would sample from another
    # distribution than the one whose log-probs the update optimises. generate() fills unset fields of a passed
    # config from the model's own, so the model's is swapped out while sampling.
    own_config = base.generation_config
    base.generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                                              pad_token_id=pad_id, cache_implementation=None if cache == "dynamic" else cache)
    if row_keys is None:
        row_keys = torch.arange(query.shape[0])
    sampler = SeededSampler(seed, row_keys.to(query.device, torch.long), temperature, query.shape[1])
    try:
        with merged_adapter(lm) if merged else contextlib.nullcontext():
            seqs = lm.generate(input_ids=query, attention_mask=query_mask, logits_processor=LogitsProcessorList([sampler]),
                               synced_gpus=synced)
    finally:
        base.generation_config = own_config
        for h in hooks:
            h.remove()
    generated = seqs[:, query.shape[1]:]
    stats = recorder.finish(generated, synced)
    if stats is None:
        logger.warning("rollout: the generation steps seen by the hooks do not match the output; computing log-probs with a forward pass")
    return generated, stats
