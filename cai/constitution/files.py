"""Constitution files: a path or the name of a shipped constitution found (`find_constitution`), read
and parsed by its suffix (`load_constitution`: YAML, or plain text by `cai.constitution.text`)."""

from __future__ import annotations

from pathlib import Path

from cai.constitution.model import Constitution, ConstitutionError, Problem, parse_constitution
from cai.constitution.text import TEXT_SUFFIXES, parse_text_constitution

DEFAULT_CONSTITUTION = "harmless-helpful"  # the shipped constitution every command judges by unless told otherwise
MAX_FILE_BYTES = 1_000_000


def load_constitution(path: str | Path) -> Constitution:
    """Read, parse and validate a constitution file, raising ConstitutionError with every problem."""
    path = Path(path)
    shown = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConstitutionError(shown, [Problem(shown, None, "", "file not found")]) from None
    except IsADirectoryError:
        raise ConstitutionError(shown, [Problem(shown, None, "", "is a directory, expected a .yaml, .txt or .md file")]) from None
    except OSError as e:
        raise ConstitutionError(shown, [Problem(shown, None, "", f"cannot read: {e.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConstitutionError(shown, [Problem(shown, None, "", f"file is {len(raw)} bytes; the limit is {MAX_FILE_BYTES}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        msg = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        raise ConstitutionError(shown, [Problem(shown, line, "", msg)]) from None
    if path.suffix.lower() in TEXT_SUFFIXES:
        return parse_text_constitution(text, source=shown, stem=path.stem)
    return parse_constitution(text, source=shown)


def find_constitution(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a constitution shipped in `constitutions/` (e.g. 'harmless-helpful')."""
    path = Path(name_or_path)
    if path.exists() or path.suffix.lower() in {".yaml", ".yml", *TEXT_SUFFIXES}:
        return path
    shipped = bundled_constitutions()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ConstitutionError(str(name_or_path), [Problem(str(name_or_path), None, "", f"no such file, and not a shipped constitution ({', '.join(sorted(shipped))})")])


def bundled_constitutions() -> dict[str, Path]:
    """The constitutions shipped with cai, by file stem."""
    folder = Path(__file__).resolve().parents[2] / "constitutions"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}

