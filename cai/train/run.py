"""Entry point for `cai train sft|rm|dpo`: resolve the config, build the task, run the loop."""

from __future__ import annotations

import logging
from pathlib import Path

from cai.train.loop import train
from cai.train.settings import TrainJob, pin_trainer_settings
from cai.train.tasks import build_task

logger = logging.getLogger(__name__)


def run_training(cfg: TrainJob) -> dict:
    out = Path(cfg.out)
    pin_trainer_settings(cfg, out)
    task = build_task(cfg, out)
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    logger.info("%s: %d training rows, %d trainable parameters, output %s", cfg.kind, len(task.train_items), trainable, out)
    return train(cfg, task, out)
