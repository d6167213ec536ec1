"""The served constitution: reloaded when its file changes, the last good version kept on error."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from cai.constitution import Constitution, ConstitutionError, load_constitution

logger = logging.getLogger(__name__)


class UnknownConstitutionError(LookupError):
    def __init__(self, wanted: str, current: str):
        self.wanted, self.current = wanted, current
        super().__init__(f"constitution {wanted!r} is not served; the server has {current[:12]} (and earlier versions it loaded)")


class ConstitutionStore:
    """Holds the current constitution of a file and every version served since start-up, by hash.

    `current()` stats the file (cheap) and reloads when its mtime or size changed. A file that
    fails validation leaves the last good version in service; the error is kept for /health.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self.reload_error: str | None = None
        self._current = load_constitution(self.path)  # a bad file at start-up is fatal: raise
        self._stamp = self._file_stamp()
        self._versions: dict[str, Constitution] = {self._current.hash: self._current}

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> Constitution:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._reload(stamp)
        return self._current

    def _reload(self, stamp: tuple[int, int] | None) -> None:
        self._stamp = stamp
        try:
            fresh = load_constitution(self.path)
        except ConstitutionError as e:
            self.reload_error = str(e)
            logger.error("constitution edit not loaded, still serving %s:\n%s", self._current.short_hash, e)
            return
        self.reload_error = None
        if fresh.hash != self._current.hash:
            logger.info("constitution reloaded: %s -> %s", self._current.short_hash, fresh.short_hash)
        self._current = fresh
        self._versions[fresh.hash] = fresh

    def get(self, wanted_hash: str | None) -> Constitution:
        """The current constitution, or an earlier served version named by hash (or hash prefix)."""
        current = self.current()
        if not wanted_hash or current.hash.startswith(wanted_hash):
            return current
        matches = [c for h, c in self._versions.items() if h.startswith(wanted_hash)]
        if len(matches) != 1:
            raise UnknownConstitutionError(wanted_hash, current.hash)
        return matches[0]
