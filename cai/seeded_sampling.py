"""Seeded sampling whose draws do not depend on the batch: `SeededSampler`, a logits processor for transformers'
`generate` that picks each token by inverse-CDF sampling from the softmax at the sampling temperature, with the
uniform number a hash of (seed, the row's key, the step) (`seeded_uniforms`), not a draw from torch's generator.

A row's tokens therefore do not depend on which other rows share its batch, on the device or on how many processes
split the work: RL rollouts across processes sample what one process would, a resumed run what the uninterrupted one
did (`cai.train.rl.sampling`), and a generation job split into shards writes the rows an unsplit one would
(`cai.policy`).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from cai.errors import CaiError


class NonFiniteLogitsError(CaiError, ArithmeticError):
    """The policy's logits at a sampling step hold NaN or +inf, or no finite value: there is no distribution to
    sample (usually a diverged policy: a learning rate too high, or an overflow under bf16)."""


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 tensors holding 32-bit values, in 16-bit halves so nothing overflows int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' lowbias32): every input bit changes about half the output bits."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_hashes(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """The (seed, row) part of `seeded_uniforms`, the same at every step (so a sampler computes it once)."""
    return _hash32(_hash32(torch.full_like(rows, seed & _MASK32) ^ (seed >> 32)) ^ rows)


def _step_uniforms(row_hashes: torch.Tensor, step: int) -> torch.Tensor:
    key = _hash32(row_hashes ^ step)
    hi, lo = _hash32(key ^ 0x68E31DA4) >> 6, _hash32(key ^ 0x1B56C4E9) >> 5  # 26 + 27 bits
    # The 53 bits joined in int64, then float64 (exact): at most 1 - 2**-53. Via a Python float the sum was
    # float32, 1.0 for about one draw in 2**25, which took the last token whatever its probability.
    return ((hi << 27) | lo).double() / 2.0 ** 53


def seeded_uniforms(seed: int, rows: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform number in [0, 1) per row key in `rows` (int64, (B,)), a pure function of (seed, row, step):
    53 random bits in float64, the same on every device."""
    return _step_uniforms(_row_hashes(seed, rows), step)


class SeededSampler(LogitsProcessor):
    """Sampling at `temperature` inside greedy `generate`: the processor leaves only the sampled token finite.

    Row r at decoding step t takes the token whose interval of the cumulative softmax holds
    `seeded_uniforms(seed, row_keys, t)[r]`: an exact draw from softmax(logits / temperature),
    independent of the rest of the batch. Tokens of zero probability are never taken. A step whose logits
    hold NaN or +inf (or only -inf) in some row raises `NonFiniteLogitsError`.
    """

    def __init__(self, seed: int, row_keys: torch.Tensor, temperature: float, query_width: int):
        self.row_keys = row_keys.long()
        self.row_hashes = _row_hashes(seed, self.row_keys)  # on the device the sampled logits will be on
        self.temperature, self.query_width = temperature, query_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.query_width
        cdf = torch.cumsum(torch.softmax(scores.float() / self.temperature, dim=-1), dim=-1, dtype=torch.float64)  # (B, V)
        total = cdf[:, -1]  # (B,) NaN when a row has NaN, +inf or no finite logit
        if not torch.isfinite(total).all():
            row = int((~torch.isfinite(total)).nonzero()[0, 0])
            raise NonFiniteLogitsError(f"sampling: the policy's logits for batch row {int(self.row_keys[row])} (this process's "
                                       f"row {row}) at response step {step} are not finite (NaN or +inf, or all -inf): "
                                       f"{scores[row][~torch.isfinite(scores[row])][:5].tolist()}...")
        # u * total in float64 can round up to total itself, which searchsorted would place past the last token
        # of non-zero probability; the largest float64 below total keeps the draw on a real token.
        u = _step_uniforms(self.row_hashes.to(scores.device), step) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # (B,) in [0, total)
        token = torch.searchsorted(cdf, u.unsqueeze(1), right=True)  # (B, 1): the first cdf entry above u
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
