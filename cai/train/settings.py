"""Settings every trainer shares, written once: the LoRA adapter (`LoraSettings`) and the optimiser
(`OptimiserSettings`). `TrainSettings` (SFT, reward model, DPO) and `PPOSettings` inherit them, so their
fields stay top-level: the same flags (`--lora-r`) and the same keys in a `cai run` config and in a run
folder's pinned `config.yaml`. The learning rate stays with each trainer, whose defaults differ.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LoraSettings(BaseModel):
    """The LoRA adapter a trainer adds to the model (peft)."""

    model_config = ConfigDict(extra="forbid")

    lora_r: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA alpha (the adapter's scale is alpha / r).")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA adapter's input.")
    lora_target_modules: list[str] | str = Field(default="all-linear", description="Modules to adapt: all-linear, or names "
                                                 "(comma-separated on the command line), e.g. q_proj,v_proj.")

    def peft_config(self, task_type: str) -> Any:
        """peft's `LoraConfig` of these settings for a model of `task_type` (CAUSAL_LM, SEQ_CLS)."""
        from peft import LoraConfig

        return LoraConfig(task_type=task_type, r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules)


class OptimiserSettings(BaseModel):
    """What every trainer's AdamW step does alike."""

    model_config = ConfigDict(extra="forbid")

    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient-norm clip.")
