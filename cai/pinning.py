"""One rule for every run folder: a rerun resumes only under the settings the run was started with.

Trainers (SFT, RM, DPO, PPO), the generators and `cai run` all call `pin_settings`. The first run
writes the settings into the folder's `run.json`; a rerun compares, key by dotted key, and refuses any
difference with the old and the new value, rather than mixing two runs in one folder. A setting absent
from the file (added to cai since the run started) counts as its default today, so upgrading cai
mid-run does not refuse a resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cai.errors import CaiError
from cai.files import write_text_atomic

PIN_FILE = "run.json"
"""The file in a run folder that holds the settings it was started with."""

LEGACY_TRAINER_PIN = "config.yaml"
"""Where trainers pinned their settings before `run.json`: a trainer's folder (one with a `checkpoint/`)
that has no `run.json` is compared against this file, so a run started then resumes, or is refused, as before."""


class RunMismatchError(CaiError, ValueError):
    """The output folder holds a run made with other settings (or files cai did not write)."""


def pin_settings(folder: Path, settings: BaseModel | dict[str, Any], *, resuming: bool = True, exclude: tuple[str, ...] = (),
                 extra: dict[str, Any] | None = None) -> None:
    """Refuse `settings` (a pydantic model or a dict, less the `exclude` keys, plus `extra`)
    if they differ from those pinned in FOLDER/run.json (or a trainer's legacy config.yaml); then write them to run.json.

    `resuming=False` says there is nothing to resume from (a trainer with no checkpoint yet): the
    file is overwritten without a comparison.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PIN_FILE
    pinned = path if path.exists() or not (folder / "checkpoint").is_dir() else folder / LEGACY_TRAINER_PIN
    now = {k: v for k, v in _as_dict(settings).items() if k not in exclude} | (extra or {})
    if resuming and pinned.exists():
        saved, current = _flatten(_read(pinned)), _flatten(now)
        before = dict(saved)
        for key, value in _defaults(settings).items():  # what the file lacks counts as today's default
            if key in current and not any(s == key or s.startswith(key + ".") or key.startswith(s + ".") for s in saved):
                before[key] = value
        diff = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        if diff:
            details = "; ".join(f"{k}: was {before.get(k)!r}, now {current.get(k)!r}" for k in diff)
            raise RunMismatchError(f"{folder} holds a run made with other settings ({details}); rerun with the same settings to "
                                   "resume, or choose another --out")
    write_text_atomic(path, json.dumps(now, indent=2))  # every process of a launch pins; none may read another's half-written file


def _as_dict(settings: BaseModel | dict[str, Any]) -> dict[str, Any]:
    data = settings.model_dump(mode="json") if isinstance(settings, BaseModel) else dict(settings)
    return json.loads(json.dumps(data, default=str))  # paths and tuples as JSON has them


def _defaults(settings: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """Dotted keys of the settings that have a default (what an older file may lack)."""
    out: dict[str, Any] = {}
    if isinstance(settings, BaseModel):
        for name, field in type(settings).model_fields.items():
            if not field.is_required():
                value = field.get_default(call_default_factory=True)
                out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return _flatten(json.loads(json.dumps(out, default=str)))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RunMismatchError(f"{path}: not a settings file written by cai ({e}); move it away or choose another --out") from None
    if not isinstance(data, dict):
        raise RunMismatchError(f"{path}: not a settings file written by cai; move it away or choose another --out")
    return data
