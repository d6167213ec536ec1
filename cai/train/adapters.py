"""Switching a peft model's adapters off for a reference pass, safely under FSDP.

The reference of DPO and PPO is the base model: the same weights with the LoRA adapter off.
peft's `disable_adapter()` also sets `requires_grad=False` on the adapter's weights on entry and
back to True on exit. Under FSDP2 a module's registered weight is sometimes its shard and
sometimes the gathered copy, so the two flips can land on different tensors: the shards the
optimiser holds were left frozen, and the adapter silently stopped training after the first
reference pass. `adapter_disabled` switches the layers off through the flag their forward reads
and touches no parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every peft adapter layer of `model` runs its base layer only. A model without adapters is unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]  # what BaseTunerLayer.disable_adapters reads
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was
