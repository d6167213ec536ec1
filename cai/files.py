"""Writing files so that a reader (or a killed run) never sees half of one, and reading JSON-lines files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside PATH (one per process, so the processes of a launch writing the
    same file do not share it), then rename it over PATH."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a child process's log, for an error that says why it failed (the full log's path goes with it)."""
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any, json.JSONDecodeError | None]]:
    """Each non-blank line of JSON-lines text, numbered from 1: (line number, value, None), or (line number, None,
    the error) for a line that is not JSON. What an unreadable line means (an error naming it, or a line skipped) is
    the caller's to say."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), None
        except json.JSONDecodeError as e:
            yield lineno, None, e
