"""The checkpoint format of every trainer (SFT, reward model, DPO, PPO): one folder, one file.

OUT/checkpoint/state.pt holds the step (PPO: iteration), the trainable weights (LoRA adapter, value
or reward head; all weights when training fully), the optimiser state, the torch/Python/CUDA RNG
states and an `extra` dict of whatever else a trainer must restore (PPO: the KL controller). It is
written to a temporary folder and renamed, so a kill mid-write leaves the previous checkpoint whole.
A restarted run loads it and repeats the uninterrupted run exactly; `truncate_log` first drops the
lines a killed run had logged past the checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from cai.pinning import RunMismatchError

STATE_FILE = "state.pt"


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).exists()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, copied to the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None) -> None:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {"step": step, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(), "extra": extra or {},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
    """Restore weights, optimiser and RNG states in place; returns (step, extra)."""
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, weights_only=False)
    params = dict(model.named_parameters())
    mismatch = {n for n, p in params.items() if p.requires_grad} ^ set(state["trainable"])
    if mismatch:
        raise RunMismatchError(f"{folder}: checkpoint does not match this model/config (parameters differ: {sorted(mismatch)[:3]}...); "
                               "use another --out or the settings it was made with")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    # Checkpoints written before `extra` existed kept PPO's KL controller at the top level.
    extra = state.get("extra") or {k: state[k] for k in ("kl_ctl",) if k in state}
    return int(state["step"]), extra


def truncate_log(path: Path, step: int) -> None:
    """Drop JSONL lines past `step` (a killed run may have logged steps it then lost with the crash)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
