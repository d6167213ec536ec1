"""A constitution file as cards, and card edits written back into the file's own text.

YAML files are edited in ruamel.yaml's round-trip mode: only the fields an edit names are assigned, so
comments, key order, quoting and the folding of the other texts stay as the author wrote them. A
plain-text constitution (`cai.constitution.text`) is edited paragraph by paragraph: a card's comparison
question is its paragraph, written back in place (with its "[id]" when the id is not the default one).

Cards are built from the file's raw structure, not from a validated `Constitution`, so a file that fails
validation still shows as cards, each carrying the problems that belong to it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from cai.constitution import TEXT_SUFFIXES, Problem
from cai.constitution.text import _EXPLICIT_ID, _LIST_ITEM, CRITIQUE_TEMPLATE, REVISION_TEMPLATE
from cai.errors import CaiError

FIELDS = ("id", "comparison", "critique", "revision", "weight")
"""A card's fields, in the order the page shows them."""
FOLD_WIDTH = 76
"""The longest line of a text the page writes as a folded YAML scalar."""


class CardEdit(BaseModel):
    """One card's change: the fields given are set; `index` is the principle's place in the version the page loaded
    (None adds a principle at the end), `delete` removes it."""

    model_config = ConfigDict(extra="forbid")

    index: int | None = Field(default=None, ge=0, le=10_000)
    delete: bool = False
    id: str | None = None
    comparison: str | None = None
    critique: str | None = None
    revision: str | None = None
    weight: float | str | None = None

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}


class EditError(CaiError, ValueError):
    """An edit that cannot be applied to the file as it is (a card that is not there, a file that does not parse)."""


@dataclass
class Card:
    """One principle as the page shows it: its fields as written in the file, where it starts, and its problems."""

    index: int
    fields: dict[str, Any]
    line: int | None
    end_line: int | None
    problems: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"index": self.index, **self.fields, "line": self.line, "problems": self.problems}


def is_text(suffix: str) -> bool:
    return suffix.lower() in TEXT_SUFFIXES


# -- YAML -------------------------------------------------------------------------------------------


def _yaml(text: str) -> tuple[YAML, Any]:
    """A round-trip YAML that writes the file back in its own indentation, and the loaded document."""
    _, sequence, offset = load_yaml_guess_indent(text)
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.allow_duplicate_keys = True  # the lint says which key is doubled; the cards still show
    yaml.width = 4096  # never rewrap what the author wrote; new long texts are folded by `_scalar`
    yaml.indent(mapping=sequence - offset if sequence > offset else 2, sequence=sequence or 4, offset=offset or 0)
    return yaml, yaml.load(text)


def _principles(doc: Any) -> list | None:
    return doc.get("principles") if isinstance(doc, dict) and isinstance(doc.get("principles"), list) else None


def yaml_cards(text: str) -> list[Card]:
    """The principles of a YAML constitution as cards (none when the text is not YAML with a principles list)."""
    try:
        _, doc = _yaml(text)
    except YAMLError:
        return []
    items = _principles(doc) or []
    starts = [(item.lc.line + 1) if isinstance(item, CommentedMap) else None for item in items]
    cards = []
    for i, item in enumerate(items):
        raw = item if isinstance(item, dict) else {}
        shown = {name: ("" if raw.get(name) is None else raw[name]) for name in FIELDS}
        shown["weight"] = raw.get("weight", 1.0)
        shown = {k: (v if isinstance(v, (int, float)) and k == "weight" else str(v)) for k, v in shown.items()}
        end = next((s - 1 for s in starts[i + 1:] if s), None)
        cards.append(Card(i, shown, starts[i], end))
    return cards


def _scalar(old: Any, value: Any) -> Any:
    """`value` in the style of the text it replaces: folded stays folded, a literal block stays one, plain stays plain
    (its end-of-line comment would otherwise land inside a block); a long new text folds."""
    if not isinstance(value, str):
        return value
    if "\n" in value.strip() or isinstance(old, LiteralScalarString):
        return LiteralScalarString(value)
    if isinstance(old, FoldedScalarString) or (old is None and len(value) > 60):
        folded = FoldedScalarString(value)
        folded.fold_pos = _fold_positions(value, FOLD_WIDTH)
        return folded
    return value


def _fold_positions(value: str, width: int) -> list[int]:
    """Where a folded scalar breaks its lines: at single spaces, so that lines stay within `width` where words allow."""
    out, start, space = [], 0, None
    for i, ch in enumerate(value):
        if ch == " " and value[i - 1:i] != " " and value[i + 1:i + 2] != " ":
            if i - start > width and space is not None:
                out.append(space)
                start = space + 1
            space = i
    if len(value) - start > width and space is not None and space > start:
        out.append(space)
    return out


def apply_yaml(text: str, edits: list[CardEdit]) -> str:
    """`text` with the card edits made, everything else (comments, order, other fields' styles) as it was."""
    try:
        yaml, doc = _yaml(text)
    except YAMLError as e:
        raise EditError(f"the file is not valid YAML now ({str(e).splitlines()[0]}); fix it in your editor or restore a version") from None
    items = _principles(doc)
    if items is None:
        raise EditError("the file has no principles list to edit; fix it in your editor or restore a version")
    for edit in edits:
        if edit.index is None:
            continue
        if edit.index >= len(items) or not isinstance(items[edit.index], dict):
            raise EditError(f"principle {edit.index} is not in the file (it has {len(items)}); reload the page")
        item = items[edit.index]
        for name, value in edit.fields().items():
            if name == "weight" and value == 1.0 and "weight" not in item:
                continue  # the default stays unwritten
            if item.get(name) != value:
                item[name] = _scalar(item.get(name), value)
    for index in sorted({e.index for e in edits if e.delete and e.index is not None}, reverse=True):
        del items[index]
    for edit in edits:
        if edit.index is None and not edit.delete:
            fresh = {name: "" for name in FIELDS[:4]} | edit.fields()
            if fresh.get("weight") == 1.0:
                del fresh["weight"]
            items.append(CommentedMap((k, _scalar(None, v)) for k, v in fresh.items()))
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


# -- plain text -------------------------------------------------------------------------------------

@dataclass
class _Block:
    """A paragraph or list item of a plain-text constitution: lines first..last (1-based), its list marker if any."""

    first: int
    last: int
    marker: str
    body: str


def _blocks(text: str) -> list[_Block]:
    """The principles' paragraphs, found as `parse_text_constitution` finds them (blank lines and headings end one)."""
    blocks: list[_Block] = []
    open_block: _Block | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            open_block = None
            continue
        item = _LIST_ITEM.match(line)
        if item or open_block is None:
            open_block = _Block(number, number, item.group(0) if item else "", line[item.end():].strip() if item else stripped)
            blocks.append(open_block)
        else:
            open_block.last = number
            open_block.body += " " + stripped
    return blocks


def text_cards(text: str) -> list[Card]:
    cards = []
    for i, block in enumerate(_blocks(text)):
        body = " ".join(block.body.split())
        explicit = _EXPLICIT_ID.match(body)
        principle = body[explicit.end():] if explicit else body
        pid = explicit.group(1) if explicit else f"p{len(cards) + 1}"
        cards.append(Card(i, {"id": pid, "comparison": principle, "critique": CRITIQUE_TEMPLATE.format(principle=principle),
                              "revision": REVISION_TEMPLATE.format(principle=principle), "weight": 1.0}, block.first, block.last))
    return cards


def apply_text(text: str, edits: list[CardEdit]) -> str:
    """`text` with each edited principle's paragraph rewritten in place (one line), deleted ones removed, new ones appended."""
    for edit in edits:
        extra = [name for name in ("critique", "revision") if getattr(edit, name) is not None]
        if extra or edit.weight not in (None, 1.0):
            raise EditError(f"a plain-text constitution has only ids and principle texts; convert it to YAML "
                            f"(`cai constitution convert`) to edit {', '.join(extra) or 'weights'}")
    lines = text.splitlines()
    blocks, cards = _blocks(text), text_cards(text)
    for edit in sorted((e for e in edits if e.index is not None), key=lambda e: e.index, reverse=True):
        if edit.index >= len(blocks):
            raise EditError(f"principle {edit.index} is not in the file (it has {len(blocks)}); reload the page")
        block, card = blocks[edit.index], cards[edit.index]
        if edit.delete:
            lines[block.first - 1:block.last] = []
            continue
        pid = edit.id if edit.id is not None else card.fields["id"]
        body = " ".join((edit.comparison if edit.comparison is not None else card.fields["comparison"]).split())
        shown = body if pid == f"p{edit.index + 1}" else f"[{pid}] {body}"
        lines[block.first - 1:block.last] = [block.marker + shown]
    for edit in edits:
        if edit.index is None and not edit.delete:
            body = " ".join((edit.comparison or "").split())
            lines += ["", f"[{edit.id}] {body}" if edit.id else body]
    return "\n".join(lines) + "\n"


def cards_with_problems(text: str, suffix: str, problems: list[Problem]) -> tuple[list[Card], list[dict]]:
    """The file's cards, each with the problems of its principle (by field, else by line), and the problems of no card."""
    cards = text_cards(text) if is_text(suffix) else yaml_cards(text)
    loose = []
    for p in problems:
        shown = {"line": p.line, "field": p.field, "message": p.message}
        by_field = re.match(r"principles\[(\d+)\]", p.field)
        index = int(by_field.group(1)) if by_field else None
        if index is None and p.line is not None:
            index = next((c.index for c in cards if c.line and c.line <= p.line <= (c.end_line or p.line)), None)
        if index is not None and index < len(cards):
            cards[index].problems.append(shown)
        else:
            loose.append(shown)
    return cards, loose
