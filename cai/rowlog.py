"""Append-only JSONL row logs that make long generation jobs resumable.

Each finished row is appended as one line and flushed to disk before the next, keyed by a stable
`id`. A job killed at any moment leaves at most one partial last line; `RowLog.open` cuts it off.
A rerun asks `done_ids()` and skips them, so nothing is lost or duplicated. A row whose status
is not "ok" (a judge failure) is retried on the next run; iterating the log gives the last row per id.
Rows are not held in memory (when they were, a job's memory grew by about 4 KiB per prefs row:
`benchmarks/generate_long.py`): the log keeps only an index, each id's first-seen place and the byte offset of its
last line, and iterating it reads the rows from the file one at a time.
A `run.json` beside the log pins the settings (`cai.pinning`), so a rerun with other settings can't mix in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cai.pinning import RunMismatchError

logger = logging.getLogger(__name__)


class RowLog:
    """The rows of a log file: `append` one, iterate the last row of each id (in first-seen order), or read one by id."""

    def __init__(self, path: Path):
        self.path = path
        self._size = 0  # bytes of whole lines in the file
        # id -> byte offset of its last line, in the order ids were first seen; None once a row is appended (a running job
        # holds nothing per row), made again from the file when next asked for
        self._index: dict[str | int, int] | None = {}
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
        """Index the file's rows, checking every line is one (a foreign file is refused, naming the line), and cut off a
        partial last line."""
        self._index, self._size, partial = self._scan()
        if partial and repair:
            logger.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", self.path, partial)
            with open(self.path, "r+b") as f:
                f.truncate(self._size)

    def _scan(self) -> tuple[dict[str | int, int], int, int]:
        """The file read one line at a time: the index of its rows, the bytes of its whole lines, and the length of a partial
        last line (0 if none)."""
        index: dict[str | int, int] = {}
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):  # a kill mid-write leaves a partial last line: it was never a finished row
                    return index, offset, len(line)
                if line.strip():
                    index[self._row_id(line, lineno)] = offset  # a later row of an id takes its place, keeping its order
                offset += len(line)
        return index, offset, 0

    def _row_id(self, line: bytes, lineno: int) -> str | int:
        try:
            row, why = json.loads(line), "no row id"
        except ValueError as e:  # not JSON, or not UTF-8
            row, why = None, e
        if not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)):
            raise RunMismatchError(f"{self.path}, line {lineno}: not a row written by cai ({why}); move the file away or use a new --out")
        return row["id"]

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._size += len(data)
        self._index = None

    def _indexed(self) -> dict[str | int, int]:
        if self._index is None:
            self._index = self._scan()[0]
        return self._index

    def __len__(self) -> int:
        """How many ids the log holds."""
        return len(self._indexed())

    def __iter__(self) -> Iterator[dict]:
        """The last row written for each id, in first-seen order, read from the file one at a time (each iteration reads
        it anew, so a log can be read more than once)."""
        return self.rows(self._indexed())

    def ids(self) -> Iterable[str | int]:
        """Every id of the log, in first-seen order (from the index: no row is read)."""
        return self._indexed().keys()

    def rows(self, ids: Iterable[str | int]) -> Iterator[dict]:
        """The last row of each of `ids`, in their order, read from the file one at a time through one handle."""
        index = self._indexed()
        if not index:  # no rows (RowLog.read of a folder without a log)
            return
        with open(self.path, "rb") as f:
            for row_id in ids:
                f.seek(index[row_id])
                yield json.loads(f.readline())

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self if r.get("status") == "ok"}

    def final_rows(self) -> list[dict]:
        """Every row of `iter(log)` in one list: for small logs and tests; the end of a job iterates instead."""
        return list(self)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RowLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
