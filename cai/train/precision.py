"""Mixed precision in one place: the autocast every trainer's forward passes run under.

`precision: auto` is bfloat16 autocast on CUDA and float32 elsewhere; `bf16` forces bfloat16 (on a
CPU without AVX512-BF16 that is very slow, but it lets a CPU test check the GPU's arithmetic);
`fp32` turns autocast off. Weights and optimiser state stay float32 either way. Whatever is
compared with the policy (DPO's reference, PPO's old log-probs) runs under the same autocast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISION_HELP = "Autocast for forward passes: auto is bf16 on CUDA and fp32 elsewhere; bf16 or fp32 force one."


def uses_bf16(precision: Precision, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: Precision, device: torch.device) -> torch.autocast:
    """bfloat16 autocast on `device` when `precision` asks for it, else a context that changes nothing."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))
