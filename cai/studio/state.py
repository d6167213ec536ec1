"""The studio's constitution file: the one file it was started with, read, checked, edited and written back.

The file on disk is the source of truth. Each read hashes its bytes (the version the page sends back
with a save); a save whose version is not the file's any more is refused as a `Conflict` carrying both
texts, never written over. A save is checked before it is written (a draft with problems is refused
as `DraftRejected`, the file keeps its last version) and written atomically, a temporary file beside
it renamed over it. Every valid version seen (at start, saved, edited on disk, restored) is kept by its
constitution hash, with its text, so any two can be compared and any one restored.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cai.constitution import Constitution, ConstitutionError, Problem, parse_constitution, parse_text_constitution
from cai.constitution.files import MAX_FILE_BYTES
from cai.errors import CaiError
from cai.files import write_text_atomic
from cai.studio.edits import CardEdit, apply_text, apply_yaml, cards_with_problems, is_text

KEPT_TEXTS = 256
"""How many recent file versions' texts are kept to show a conflicting save against (a long session's edits)."""


@dataclass
class Snapshot:
    """The file as read once: its bytes' hash, its text, and the constitution it holds or the problems it has."""

    file_hash: str
    text: str
    constitution: Constitution | None
    problems: list[Problem]


@dataclass
class Version:
    """A valid version of the constitution: its text, how it came, and what was measured of it."""

    constitution: Constitution
    text: str
    source: str
    seen_at: float
    figures: dict | None = None
    rows: list[dict] | None = field(default=None, repr=False)

    def summary(self) -> dict:
        agreement = (self.figures or {}).get("agreement")
        return {"hash": self.constitution.hash, "short_hash": self.constitution.short_hash, "name": self.constitution.name,
                "principles": len(self.constitution.principles), "source": self.source, "seen_at": self.seen_at,
                "agreement": agreement, "measured": self.figures is not None}


class Conflict(CaiError, RuntimeError):
    """A save from a page that loaded another version than the file holds now."""

    def __init__(self, theirs: Snapshot, mine: str | None):
        self.theirs, self.mine = theirs, mine
        super().__init__("the file changed since this page loaded it (edited elsewhere); nothing was written: "
                         "compare the two versions, then take the file's or save yours over it")


class DraftRejected(CaiError, ValueError):
    """A save whose text has problems; the file was not written."""

    def __init__(self, draft: str, problems: list[Problem]):
        self.draft, self.problems = draft, problems
        super().__init__("; ".join(str(p) for p in problems[:3]) + (" ..." if len(problems) > 3 else ""))


class ConstitutionFile:
    """The studio's one constitution file: read (and its versions recorded), saved with a conflict check, restored."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        self.format = "text" if is_text(self.path.suffix) else "yaml"
        self._lock = threading.Lock()
        self._texts: dict[str, str] = {}
        self._last: Snapshot | None = None
        self.versions: dict[str, Version] = {}
        first = self.read(source="start")
        if first.constitution is None:
            raise ConstitutionError(str(self.path), first.problems)
        self.in_service: Constitution = first.constitution

    # -- reading ----------------------------------------------------------------------------------
    def read(self, source: str = "on disk") -> Snapshot:
        """The file now (parsed again only when its bytes changed); a new valid version is recorded and put in service."""
        with self._lock:
            return self._read(source)

    def _read(self, source: str) -> Snapshot:
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            return Snapshot("", "", None, [Problem(str(self.path), None, "", f"cannot read the file: {e.strerror}")])
        file_hash = hashlib.sha256(raw).hexdigest()
        if self._last is not None and self._last.file_hash == file_hash:
            return self._last
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = Problem(str(self.path), raw[: e.start].count(b"\n") + 1, "",
                              f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8")
            snapshot = Snapshot(file_hash, raw.decode("utf-8", errors="replace"), None, [problem])
        else:
            snapshot = self._check(text, file_hash)
        self._last = snapshot
        self._texts[file_hash] = snapshot.text
        while len(self._texts) > KEPT_TEXTS:
            del self._texts[next(iter(self._texts))]
        if snapshot.constitution is not None:
            self.in_service = snapshot.constitution
            version = self.versions.get(snapshot.constitution.hash)
            if version is None:
                self.versions[snapshot.constitution.hash] = Version(snapshot.constitution, text, source, time.time())
            else:
                version.text = text  # the same principles, perhaps other comments: restoring gives the latest
        return snapshot

    def _check(self, text: str, file_hash: str = "") -> Snapshot:
        source = str(self.path)
        if len(text.encode("utf-8")) > MAX_FILE_BYTES:
            return Snapshot(file_hash, text, None, [Problem(source, None, "", f"the text is over {MAX_FILE_BYTES} bytes, the limit "
                                                            "of a constitution file")])
        try:
            if self.format == "text":
                constitution = parse_text_constitution(text, source=source, stem=self.path.stem)
            else:
                constitution = parse_constitution(text, source=source)
        except ConstitutionError as e:
            return Snapshot(file_hash, text, None, e.problems)
        return Snapshot(file_hash, text, constitution, [])

    def view(self, snapshot: Snapshot) -> dict:
        """What the page shows of a snapshot: cards with their problems, the loose problems, the version in service."""
        cards, loose = cards_with_problems(snapshot.text, self.path.suffix, snapshot.problems)
        c = snapshot.constitution
        return {"path": str(self.path), "format": self.format, "file_hash": snapshot.file_hash, "text": snapshot.text,
                "valid": c is not None, "constitution_hash": c.hash if c else None, "name": c.name if c else None,
                "cards": [card.as_dict() for card in cards], "problems": loose,
                "in_service": {"hash": self.in_service.hash, "short_hash": self.in_service.short_hash, "name": self.in_service.name}}

    # -- writing ----------------------------------------------------------------------------------
    def save(self, base: str, edits: list[CardEdit]) -> Snapshot:
        """Apply the card edits to the version `base` (the file's bytes' hash the page loaded) and write it."""
        with self._lock:
            current = self._read("on disk")
            if current.file_hash != base:
                loaded = self._texts.get(base)
                raise Conflict(current, self._apply(loaded, edits) if loaded is not None else None)
            return self._write(self._apply(current.text, edits), "saved")

    def restore(self, base: str, constitution_hash: str) -> Snapshot:
        """Write a recorded version back, through the same conflict check as a save."""
        with self._lock:
            version = self.versions.get(constitution_hash)
            if version is None:
                raise KeyError(constitution_hash)
            current = self._read("on disk")
            if current.file_hash != base:
                raise Conflict(current, version.text)
            return self._write(version.text, "restored")

    def _apply(self, text: str, edits: list[CardEdit]) -> str:
        return apply_text(text, edits) if self.format == "text" else apply_yaml(text, edits)

    def _write(self, text: str, source: str) -> Snapshot:
        draft = self._check(text)
        if draft.constitution is None:
            raise DraftRejected(text, draft.problems)
        write_text_atomic(self.path, text)
        return self._read(source)
