"""Gradient checkpointing (activation recomputation): the setting `gradient_checkpointing` of every trainer.

A backward pass needs what each layer's forward computed (its inputs to every matmul, the attention's
keys and values, the MLP's activations). A decoder layer of SmolLM2 keeps about 20 such tensors per
token; over 30 layers that is most of a training step's memory above the weights. With
`recompute_layers(model)`, each decoder layer keeps only its input: its forward runs without saving
anything, and runs again inside the backward, when its own gradients are due (torch's non-reentrant
`torch.utils.checkpoint`). About one more forward pass per step buys the activations of all but one layer.

The layers are those transformers marks as checkpoint units (`GradientCheckpointingLayer`: every decoder
layer of the Llama, Qwen, Mistral and Gemma families, among others). transformers' own switch
(`gradient_checkpointing_enable`) recomputes only while a layer is in training mode; the RL trainers keep
the policy in eval mode (no dropout in any pass), so cai wraps each layer's forward instead, and recomputes
whenever gradients are on. Passes without gradients (sampling with its KV cache, the reference, the
scorer) run exactly as before. A forward with gradients must not carry a KV cache (the recomputation would
write it twice): every cai training forward passes `use_cache=False`.

TRL's GRPOTrainer turns this on by default; cai leaves it off, since it costs time: on SmolLM2's GRPO step
(16 answers of 32 tokens, CPU) it cut the peak from 3,605 to 2,437 MiB for 9% of the tokens/s
(`benchmarks/grpo_throughput.py --gradient-checkpointing` measures both).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def recompute_layers(model: torch.nn.Module) -> int:
    """Make every decoder layer of `model` recompute its activations in the backward when gradients are on; returns
    how many layers. Raises ConfigError for a model transformers marks no such layer in."""
    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    from cai.errors import ConfigError

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} has no decoder layers transformers marks for "
                          "checkpointing (GradientCheckpointingLayer); train without --gradient-checkpointing")
    for layer in layers:
        if getattr(layer.forward, "recomputed", False):
            continue  # already wrapped

        def recomputed(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            if kwargs.get("past_key_values") is not None:
                raise RuntimeError("a forward with gradients through recomputed layers got a KV cache, which the "
                                   "recomputation would update twice: call the model with use_cache=False")
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        recomputed.recomputed = True
        layer.forward = recomputed
    logger.info("gradient checkpointing: %d %s layers recompute their activations in the backward", len(layers),
                type(layers[0]).__name__)
    return len(layers)
