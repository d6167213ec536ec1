"""A content-addressed cache of judge answers, so a rerun does not ask the judge again.

The key is sha256 over the endpoint, the judge model, the constitution hash and the request's
JSON: any change in what is asked, of whom, under which constitution, is a different key.
SQLite in WAL mode: safe when a job is killed mid-write, and shared by concurrent jobs.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from cai.models import cache_dir

T = TypeVar("T", bound=BaseModel)


def default_cache_path() -> Path:
    """Where judge answers are cached unless a job names another file: one cache for every job of this user."""
    return cache_dir() / "judge-cache.sqlite"


class JudgeCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(endpoint: str, judge_model: str, constitution_hash: str, request: BaseModel) -> str:
        body = json.dumps(request.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(f"{endpoint}\x00{judge_model}\x00{constitution_hash}\x00{body}".encode()).hexdigest()

    def get(self, key: str, model: type[T]) -> T | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return model.model_validate_json(row[0])

    def put(self, key: str, value: BaseModel) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)", (key, value.model_dump_json()))
            self._db.commit()

    def close(self) -> None:
        self._db.close()
