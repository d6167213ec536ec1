"""What every policy backend shares (`cai.policy`'s in-process ones, `cai.policy_servers`' OpenAI-compatible servers):
how the policy samples (`SamplingConfig`), one answer (`Sample`), and the seed of one sample (`sample_seed`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class SamplingConfig(BaseModel):
    """How the policy samples; recorded in every row's provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=128, ge=1, description="Longest policy answer in tokens (cut answers end 'length').")
    temperature: float = Field(default=0.7, ge=0.0, description="Policy sampling temperature; 0 is greedy.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Policy nucleus sampling mass.")

    def as_dict(self) -> dict:
        return self.model_dump()


@dataclass
class Sample:
    text: str
    finish_reason: str  # "stop" (EOS), "length", or "error" (a policy server's failure: `error` says what)
    tokens: int
    error: str | None = None


def sample_seed(*parts) -> int:
    """A 32-bit seed from (run seed, prompt, sample index, ...): the same parts give the same seed on every backend."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:4], "big")
