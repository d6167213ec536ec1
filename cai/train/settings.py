"""The trainers' settings. Written once and shared: the LoRA adapter (`LoraSettings`) and the optimiser
(`OptimiserSettings`), which `TrainSettings` (SFT, reward model, DPO, below) and `RLSettings`
(`cai.train.rl.settings`) inherit, so their fields stay top-level: the same flags (`--lora-r`) and the
same keys in a `cai run` config and in a run folder's pinned `run.json`; so do `ComputeSettings`
(autocast, gradient checkpointing). The learning rate stays with each trainer, whose defaults differ. `TrackingSettings` (the experiment trackers a trainer reports to,
`report_to`) live with the trackers in `cai.train.trackers`. `TrainJob` is one `cai train sft|rm|dpo` run; `pin_trainer_settings`
pins a trainer's output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.train.precision import DEFAULT_PRECISION, PRECISION_HELP, Precision
from cai.train.trackers import TrackingSettings


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


class ComputeSettings(BaseModel):
    """How a trainer's forward and backward passes run: autocast and activation memory."""

    model_config = ConfigDict(extra="forbid")

    precision: Precision = Field(default=DEFAULT_PRECISION, description=PRECISION_HELP)
    gradient_checkpointing: bool = Field(default=False, description="Recompute each decoder layer's activations in the "
                                         "backward pass instead of keeping them from the forward (cai.train.recompute): "
                                         "far less memory for long sequences and large batches, for about one more "
                                         "forward pass per step. TRL's name; TRL's GRPO turns it on by default.",
                                         json_schema_extra={"cli": "--gradient-checkpointing/--keep-activations"})


class TrainSettings(TrackingSettings, OptimiserSettings, LoraSettings, ComputeSettings):
    """How SFT, a reward model or DPO trains: every setting with its default (what a `cai run` config's
    `sft:`, `rm:` and `rl.dpo:` sections hold); the LoRA and optimiser settings are those PPO shares."""

    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Held-out share of the rows (seeded split).")
    lora: bool = Field(default=True, description="Train a LoRA adapter (peft); false (--full) trains all weights.",
                       json_schema_extra={"cli": "--lora/--full"})
    lr: float = Field(default=1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(default=4, ge=1, description="Rows (pairs for rm/dpo) per micro-batch.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimiser step.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training rows.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps.")
    max_length: int = Field(default=512, ge=8, description="Tokens per sequence (prompt + response).")
    beta: float = Field(default=0.1, gt=0, description="dpo: the KL strength beta.")
    rpo_alpha: float = Field(default=0.0, ge=0, description="dpo: weight of the preferred answers' NLL added to the loss (RPO; "
                             "TRL's rpo_alpha, 1.0 in its paper): a token mean over the preferred answers of the whole optimiser step "
                             "(TRL pools the tokens too, per micro-batch); the preferred answer is chosen where p_chosen >= 0.5, "
                             "else rejected. Keeps DPO from lowering both answers at once.")
    checkpoint_every: int = Field(default=50, ge=1, description="Optimiser steps between checkpoints (resumable).")
    seed: int = Field(default=0, description="Seeds the split, data order and initialisation.")


class TrainJob(TrainSettings):
    """One `cai train sft|rm|dpo` run: the settings plus what it trains on and where it writes."""

    kind: Literal["sft", "rm", "dpo"] = Field(description="sft: messages; rm: reward model on pairs; dpo: policy on pairs.")
    model: str = Field(description="Base model: folder, hub id or embedded name.")
    data: str = Field(description="Training data: datasets folder, .jsonl or .json (as `cai generate` writes).")
    out: str = Field(description="Output folder: adapter, checkpoints, metrics.jsonl, loss.png, run.json; rerun the same "
                     "command to resume from its checkpoint.")


UNPINNED = (*TrackingSettings.model_fields, "gradient_checkpointing")
"""Settings a trainer's run.json leaves out, since they do not change what a run computes: the trackers (a resumed
run may report to others) and gradient checkpointing (a run that ran out of memory may resume with it on)."""


def pin_trainer_settings(job: BaseModel, out: Path) -> None:
    """OUT/run.json: a trainer's resolved settings. A checkpoint in OUT resumes only under the settings it was
    made with (else the run would mix two); with no checkpoint the file is simply written. `UNPINNED` is left out."""
    from cai.pinning import pin_settings
    from cai.train.checkpoint import has_checkpoint

    pin_settings(out, job, resuming=has_checkpoint(Path(out) / "checkpoint"), exclude=UNPINNED)
