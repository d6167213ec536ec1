"""Append-only JSONL row logs that make long generation jobs resumable.

Each finished row is appended as one line and flushed to disk before the next, keyed by a stable
`id`. A job killed at any moment leaves at most one partial last line; `RowLog.open` cuts it off.
A rerun asks `done_ids()` and skips them, so nothing is lost or duplicated. A row whose status
is not "ok" (a judge failure) is retried on the next run; `final_rows()` keeps the last row per id.
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
        self._rows: dict[str, dict] = {}
        self._order: list[str] = []
        self._file = None

    @classmethod
    def open(cls, path: str | Path) -> RowLog:
        log = cls(Path(path))
        log.path.parent.mkdir(parents=True, exist_ok=True)
        if log.path.exists():
            log._load()
        log._file = open(log.path, "a", encoding="utf-8")
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
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            # A kill mid-write leaves a partial last line: it was never a finished row.
            if repair:
                logger.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", self.path, len(raw) - end)
                with open(self.path, "r+b") as f:
                    f.truncate(end)
            raw = raw[:end]
        for lineno, row, error in json_lines(raw.decode("utf-8").splitlines()):
            if error is not None or not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)):
                why = error or "no row id"
                raise RunMismatchError(f"{self.path}, line {lineno}: not a row written by cai ({why}); move the file away or use a new --out")
            self._remember(row)

    def _remember(self, row: dict) -> None:
        key = row["id"]
        if key not in self._rows:
            self._order.append(key)
        self._rows[key] = row

    def append(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._remember(row)

    def done_ids(self) -> set[str]:
        return {k for k, r in self._rows.items() if r.get("status") == "ok"}

    def final_rows(self) -> list[dict]:
        """The last row written for each id, in first-seen order."""
        return [self._rows[k] for k in self._order]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RowLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
