"""Mixed precision in one place: the autocast every trainer's forward passes run under.

`precision: auto` is bfloat16 autocast on CUDA and float32 elsewhere; `bf16` forces bfloat16 (on a
CPU without AVX512-BF16 that is very slow, but it lets a CPU test check the GPU's arithmetic);
`fp32` turns autocast off. Whatever is compared with the policy (DPO's reference, PPO's old
log-probs) runs under the same autocast.

Weights: under bf16 autocast, base weights that do not train (LoRA's frozen base) are loaded in
bfloat16 (`base_dtype`): in float32 autocast would cast every one of them again at every matmul
(for a 1.4B model, 5.6 GB read per PPO decoding step instead of 2.8). What trains (the adapter, a
value or score head, all weights without LoRA) stays float32 (`trainable_in_fp32`), and so does
the optimiser state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "fp32", "bf16"]
DEFAULT_PRECISION: Precision = "auto"
PRECISION_HELP = "Autocast for forward passes: auto is bf16 on CUDA and fp32 elsewhere; bf16 or fp32 force one."


def uses_bf16(precision: Precision, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: Precision, device: torch.device) -> torch.autocast:
    """bfloat16 autocast on `device` when `precision` asks for it, else a context that changes nothing."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))


def base_dtype(precision: Precision, device: torch.device, *, frozen: bool) -> torch.dtype:
    """The dtype a model's weights load in: bfloat16 when they are `frozen` and run under bf16 autocast, else float32."""
    import torch

    return torch.bfloat16 if frozen and uses_bf16(precision, device) else torch.float32


def trainable_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Cast every parameter that trains to float32 (peft may create an adapter in its bf16 base layer's dtype)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model
