"""Settings files: a YAML file and command-line values merged into one settings model.

Every command that takes `--config FILE` (cai train, cai judge serve) and `cai run` read their
settings here, so a misspelt key, a wrong type or a value out of range is refused the same way,
naming the file (or "flags") and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cai.errors import ConfigError, describe_validation_error


def load_settings(path: str | Path | None, overrides: dict[str, Any], schema: type[BaseModel]) -> Any:
    """Merge the YAML file (if any) with non-None overrides into `schema`; errors name the file and the field."""
    data: dict[str, Any] = {}
    where = str(path) if path else "flags"
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        data.update(loaded)
    for key, value in overrides.items():
        if value is None:
            continue
        # A nested section given in part (a generator's sampling from flags) keeps the file's other values.
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, where)) from None
