"""Entry point for `cai train sft|rm|dpo`: resolve the config, build the task, run the loop."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from cai.train.config import TrainConfig, save_config
from cai.train.loop import train
from cai.train.tasks import build_task

logger = logging.getLogger(__name__)


def refuse_changed_settings(cfg: BaseModel, out: Path) -> None:
    """A checkpoint in `out` resumes only under the settings it was made with (else the run would mix two)."""
    previous = out / "config.yaml"
    if previous.exists() and (out / "checkpoint").exists():
        import yaml

        saved = yaml.safe_load(previous.read_text(encoding="utf-8"))
        # A setting added to cai since the run started is not in its file: it counts as today's default.
        defaults = {k: f.get_default(call_default_factory=True) for k, f in type(cfg).model_fields.items() if not f.is_required()}
        before = {**defaults, **saved}
        now = cfg.model_dump()
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            raise ValueError(f"{out} holds a checkpoint made with other settings ({', '.join(diff)}); "
                             "rerun with the same settings to resume, or choose another --out")


def run_training(cfg: TrainConfig) -> dict:
    out = Path(cfg.out)
    refuse_changed_settings(cfg, out)
    save_config(cfg, out)
    task = build_task(cfg, out)
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    logger.info("%s: %d training rows, %d trainable parameters, output %s", cfg.kind, len(task.train_items), trainable, out)
    return train(cfg, task, out)
