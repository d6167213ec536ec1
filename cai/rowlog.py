"""Append-only JSONL row logs that make long generation jobs resumable.

Each finished row is appended as one line and flushed to disk before the next, keyed by a stable
`id`. A job killed at any moment leaves at most one partial last line; `RowLog.open` cuts it off.
A rerun asks `done_ids()` and skips them, so nothing is lost or duplicated. A row whose status
is not "ok" (a judge failure) is retried on the next run; `final_rows()` keeps the last row per id.
Rows are not held in memory while a job runs (when they were, its memory grew by about 4 KiB per prefs row:
`benchmarks/generate_long.py`); `final_rows()` and `done_ids()` read them from the file when asked (at the end), or
use those read at open until the first row is appended (at resume).
A `run.json` beside the log pins the settings (`cai.pinning`), so a rerun with other settings can't mix in.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cai.files import json_lines
from cai.pinning import RunMismatchError

logger = logging.getLogger(__name__)


class RowLog:
    def __init__(self, path: Path):
        self.path = path
        self._size = 0  # bytes of whole lines in the file
        self._loaded: dict[str | int, dict] | None = None  # the rows read at open, until the first append
        self._file = None

    @classmethod
    def open(cls, path: str | Path) -> RowLog:
        log = cls(Path(path))
        log.path.parent.mkdir(parents=True, exist_ok=True)
        if log.path.exists():
            log._load()
        log._file = open(log.path, "ab")
        return log

    @classmethod
    def read(cls, path: str | Path) -> RowLog:
        """The log's rows, read only (for `cai generate merge`): the file is left as it is, a partial last line in it skipped;
        no file reads as no rows."""
        log = cls(Path(path))
        if log.path.exists():
            log._load(repair=False)
        return log

    def _load(self, repair: bool = True) -> None:
        """Check every line is a row (a foreign file is refused, naming the line) and cut off a partial last line."""
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw) and repair:
            # A kill mid-write leaves a partial last line: it was never a finished row.
            logger.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", self.path, len(raw) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        self._size = end
        self._loaded = self._rows(raw[:end])

    def _rows(self, raw: bytes) -> dict[str | int, dict]:
        """The last row per id of whole lines `raw`, in first-seen order."""
        rows: dict[str | int, dict] = {}
        for lineno, row, error in json_lines(raw.decode("utf-8").splitlines()):
            if error is not None or not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)):
                why = error or "no row id"
                raise RunMismatchError(f"{self.path}, line {lineno}: not a row written by cai ({why}); move the file away or use a new --out")
            rows[row["id"]] = row  # a later row of an id takes its place, keeping the first-seen order
        return rows

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._size += len(data)
        self._loaded = None

    def done_ids(self) -> set[str]:
        return {k for k, r in self._read().items() if r.get("status") == "ok"}

    def final_rows(self) -> list[dict]:
        """The last row written for each id, in first-seen order (read from the file)."""
        return list(self._read().values())

    def _read(self) -> dict[str | int, dict]:
        if self._loaded is not None:
            return self._loaded
        if not self._size:
            return {}
        with open(self.path, "rb") as f:
            return self._rows(f.read(self._size))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RowLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
