"""The one base class of every error a user can cause and fix: a bad file, setting, prompt set,
model name or request, an unreachable judge, a run folder holding another run.

The CLI catches `CaiError` and prints its message (which names the file, line, field or request)
without a traceback; anything else is a bug and keeps its traceback. Each subclass also derives
from the builtin that fits (ValueError, RuntimeError, KeyError), so `except ValueError` still works.
"""

from __future__ import annotations


class CaiError(Exception):
    """An error the user can fix; the message says what and where."""


class ConfigError(CaiError, ValueError):
    """Settings that can't be used (a config file, flags, a job's options); the message names the field."""


class ModelResolutionError(CaiError, ValueError):
    """A model name that is neither a usable folder, a hub id, nor an embedded model."""


def describe_validation_error(error, where: str) -> str:
    """A pydantic ValidationError as one line: `WHERE: field.path: message; ...`."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
    return f"{where}: {problems}"
