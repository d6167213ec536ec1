"""Plain-text constitutions: a `.txt` or `.md` file with one principle per paragraph.

Published constitutions are lists of principles in prose ("Please choose the response that is the
most helpful, honest, and harmless."). Such a file loads as a constitution as it is:

    # Harmless assistant                      <- optional first heading: the name (slugified) and description
    Please choose the response that is less harmful, and that does not help anyone hurt people.

    Please choose the response that an ethical and wise person would give.
    A paragraph may run over several lines.

    - Markdown list items are principles too, one per item.
    [no-flattery] Choose the response with less empty praise.   <- optional "[id]" keeps an id stable

Each paragraph (or list item) is one principle: its text is the comparison question, and its
critique and revision requests are made from CRITIQUE_TEMPLATE and REVISION_TEMPLATE below. Ids are
p1, p2, ... in file order unless given as a leading "[id]". Lines starting with '#' are headings
(the first one, before any principle, names the constitution; others are section titles) and are
not principles. Without a heading the name is the file's stem.

The result is an ordinary `Constitution`, so its hash is that of its content: the YAML written by
`to_yaml` (`cai constitution convert FILE.txt`) loads to the same hash.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from cai.constitution.model import Constitution, ConstitutionError, Problem, validate_constitution_data

TEXT_SUFFIXES = (".txt", ".md")
"""The suffixes of a plain-text constitution; any other file is read as YAML."""

CRITIQUE_TEMPLATE = "Identify specific ways in which the assistant's last response falls short of this principle: {principle}"
REVISION_TEMPLATE = ("Rewrite the assistant's response so that it follows this principle: {principle} "
                     "Keep what the response already does well.")
DEFAULT_DESCRIPTION = "Principles from a plain-text constitution; critique and revision requests come from cai's template."
# Principle texts are limited to 8000 characters; the critique request adds the template around it.
MAX_PRINCIPLE_CHARS = 8000 - max(len(CRITIQUE_TEMPLATE), len(REVISION_TEMPLATE))

_LIST_ITEM = re.compile(r"^\s{0,3}(?:[-*+]|\d{1,3}[.)])\s+")
_EXPLICIT_ID = re.compile(r"^\[([^\]\s]{1,64})\]\s*")


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:64].rstrip("-")
    return slug or "constitution"


def parse_text_constitution(text: str, *, source: str = "<string>", stem: str = "constitution") -> Constitution:
    """Parse a plain-text constitution, raising ConstitutionError with every problem and its line."""
    heading: tuple[str, int] | None = None
    blocks: list[tuple[int, list[str]]] = []  # (first line, lines) of each paragraph or list item
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            current = None
            continue
        if stripped.startswith("#"):
            if heading is None and not blocks:
                heading = (stripped.lstrip("#").strip(), number)
            current = None
            continue
        item = _LIST_ITEM.match(line)
        if item:
            stripped = line[item.end():].strip()
        if current is None or item:
            current = []
            blocks.append((number, current))
        current.append(stripped)

    problems: list[Problem] = []
    lines: dict[tuple, int] = {(): 1}
    principles: list[dict[str, Any]] = []
    for first_line, block in blocks:
        body = " ".join(" ".join(block).split())
        explicit = _EXPLICIT_ID.match(body)
        pid = explicit.group(1) if explicit else f"p{len(principles) + 1}"
        body = body[explicit.end():] if explicit else body
        if not body:
            problems.append(Problem(source, first_line, "", f"principle [{pid}] has no text after its id"))
            continue
        if len(body) > MAX_PRINCIPLE_CHARS:
            problems.append(Problem(source, first_line, "", f"principle is {len(body)} characters; the limit is {MAX_PRINCIPLE_CHARS}"
                                    " (a blank line starts a new principle)"))
            continue
        loc = ("principles", len(principles))
        lines[loc] = first_line
        principles.append({"id": pid, "critique": CRITIQUE_TEMPLATE.format(principle=body),
                           "revision": REVISION_TEMPLATE.format(principle=body), "comparison": body})
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if p["comparison"] in seen:
            problems.append(Problem(source, lines[("principles", i)], f"principles[{i}]",
                                    f"the same principle as line {lines[('principles', seen[p['comparison']])]}"))
        seen.setdefault(p["comparison"], i)
    if not principles and not problems:
        problems.append(Problem(source, None, "", "no principles found: write one principle per paragraph (blank line between)"))
    if problems:
        raise ConstitutionError(source, problems)
    if heading is not None:
        lines[("name",)] = lines[("description",)] = heading[1]
    data = {
        "name": _slug(heading[0] if heading and heading[0] else stem),
        "description": heading[0] if heading and heading[0] else DEFAULT_DESCRIPTION,
        "principles": principles,
    }
    return validate_constitution_data(data, lines, source)


# -- YAML for further editing --------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = ">" if len(value) > 60 and "\n" not in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(constitution: Constitution, *, source: str) -> str:
    """The constitution as a YAML file of cai's format, with a header saying where it came from."""
    data = constitution.model_dump(mode="json", exclude_defaults=True)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=96)
    header = (
        f"# {constitution.name}: converted from {source} by `cai constitution convert`.\n"
        "# Each principle's critique and revision came from cai's plain-text template; edit them here\n"
        "# to fit the principle, then check the file with `cai constitution lint`.\n\n"
    )
    text = header + body
    round_trip = Constitution.model_validate(yaml.safe_load(text))
    if round_trip.hash != constitution.hash:  # a YAML quoting bug must not silently change the principles
        raise ConstitutionError(source, [Problem(source, None, "", "conversion to YAML changed the content; please report this")])
    return text
