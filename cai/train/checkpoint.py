"""The checkpoint format of every trainer (SFT, reward model, DPO, PPO): one folder, one file.

OUT/checkpoint/state.pt holds the step (PPO: iteration), the trainable weights (LoRA adapter, value
or reward head; all weights when training fully), the optimiser state, the torch/Python/CUDA RNG
states and an `extra` dict of whatever else a trainer must restore (PPO: the KL controller). It is
written to a temporary folder and renamed, so a kill mid-write leaves the previous checkpoint whole.
A restarted run loads it (`resume`) and repeats the uninterrupted run exactly; the main process first drops
the lines a killed run had logged past the checkpoint (`truncate_log`).

Under FSDP (accelerate's FSDP2: every parameter a DTensor holding this process's shard) the trainable
weights and the optimiser state are gathered whole with torch's `torch.distributed.checkpoint.state_dict`
(frozen weights are skipped), so the file is the same single file; every process must then call
`save_checkpoint` and `trainable_state`, and only the one with `write=True` writes. The optimiser state
is then keyed by parameter name instead of position, and such a checkpoint resumes under FSDP only.
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


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the parameters are FSDP shards (DTensors) rather than whole tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def sharded_units(model: torch.nn.Module) -> list[str]:
    """The names of the FSDP units (modules that gather their weights together), "" for the root."""
    from torch.distributed.fsdp import FSDPModule

    return [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]


def launch_record(accelerator, model: torch.nn.Module) -> dict[str, Any]:
    """How a run was launched, for its summary.json: process count, accelerate's distributed type, sharding."""
    return {"processes": accelerator.num_processes, "distributed": accelerator.distributed_type.value,
            "sharded": is_sharded(model), "fsdp_units": len(sharded_units(model))}


def _whole(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kw)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, whole and on the CPU. Sharded (FSDP): a collective every process must
    call; the gathered tensors reach the first process only (the others get an empty dict)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        whole = get_model_state_dict(model, options=_whole(cpu_offload=True))
        # ignore_frozen_params keeps the alias of a tied frozen weight (lm_head.weight tied to the embeddings)
        trains = {n for n, p in model.named_parameters() if p.requires_grad}
        return {n: t for n, t in whole.items() if n in trains}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None, write: bool = True) -> None:
    """Write the checkpoint if `write` (the main process); under FSDP every process calls it to gather."""
    sharded = is_sharded(model)
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        trainable = trainable_state(model)
        optim = get_optimizer_state_dict(model, optimizer, options=_whole(cpu_offload=True))
    else:
        trainable, optim = (trainable_state(model), optimizer.state_dict()) if write else ({}, {})
    if not write:
        return
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {"step": step, "trainable": trainable, "optimizer": optim, "extra": extra or {}, "sharded": sharded,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def save_final(folder: Path, model: torch.nn.Module, tokenizer, weights: dict[str, torch.Tensor] | None = None,
               value_head: torch.nn.Module | None = None) -> None:
    """Write a trainer's final artefact to `folder`: `model.save_pretrained` (the peft adapter with any head it
    trains, or the whole model when training fully), the tokenizer, and PPO's `value_head` as value_head.pt.

    `weights`: the trained weights gathered whole (`trainable_state`) when the model is sharded, else None
    (the modules' own tensors are whole); peft keeps the adapter's (and the reward head's) entries. With a
    `value_head`, `model` is the policy's language model and `weights` the whole policy's, keyed "lm." and
    "value_head."."""
    folder = Path(folder)
    if value_head is not None:
        head = value_head.state_dict() if weights is None else _part(weights, "value_head.")
        weights = None if weights is None else _part(weights, "lm.")
    model.save_pretrained(folder, state_dict=weights)
    if value_head is not None:
        torch.save(head, folder / "value_head.pt")
    tokenizer.save_pretrained(folder)


def _part(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
    """Restore weights, optimiser and RNG states in place; returns (step, extra)."""
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, weights_only=False)
    params = dict(model.named_parameters())
    mismatch = {n for n, p in params.items() if p.requires_grad} ^ set(state["trainable"])
    if mismatch:
        raise RunMismatchError(f"{folder}: checkpoint does not match this model/config (parameters differ: {sorted(mismatch)[:3]}...); "
                               "use another --out or the settings it was made with")
    sharded = is_sharded(model)
    if state.get("sharded", False) != sharded:
        made, now = ("an FSDP", "without FSDP") if not sharded else ("a non-FSDP", "under FSDP")
        raise RunMismatchError(f"{folder}: the checkpoint was written by {made} run and this one runs {now}; "
                               "resume with the launch it was made with, or use another --out")
    if sharded:  # every process holds the whole file and keeps its own shard of it
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, state["trainable"], options=_whole(strict=False))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_whole())
    else:
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


def resume(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, logs: tuple[Path, ...],
           write: bool = True) -> tuple[int, dict[str, Any]]:
    """Where a run starts: (0, {}) without a checkpoint in `folder`, else what `load_checkpoint` restores. Every
    process loads; the one with `write=True` (the main one, which alone writes the logs) then drops the lines
    of `logs` past that step, since several processes rewriting one file would race."""
    step, extra = load_checkpoint(folder, model, optimizer) if has_checkpoint(folder) else (0, {})
    if write:
        for path in logs:
            truncate_log(path, step)
    return step, extra


def truncate_log(path: Path, step: int) -> None:
    """Drop JSONL lines past `step` (a killed run may have logged steps it then lost with the crash)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
