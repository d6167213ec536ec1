"""The constitution model: `Constitution` and its principles and examples, parsed from YAML text and
validated with every problem's line and field (`parse_constitution`, `validate_constitution_data`), and
its content hash."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Annotated, Any, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from cai.errors import CaiError

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=8000)]
Identifier = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
]


class Principle(BaseModel):
    """One entry of a constitution."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Identifier
    critique: NonEmptyText
    revision: NonEmptyText
    comparison: NonEmptyText
    weight: float = Field(default=1.0, gt=0, le=1000)


class Example(BaseModel):
    """A few-shot demonstration of critique and revision."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: NonEmptyText
    response: NonEmptyText
    critique: NonEmptyText
    revision: NonEmptyText
    principle: Identifier | None = None


class Constitution(BaseModel):
    """A validated constitution. Build it with `load_constitution` or `parse_constitution`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Identifier
    description: NonEmptyText
    principles: list[Principle] = Field(min_length=1, max_length=1000)
    examples: list[Example] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _check_ids(self) -> Constitution:
        seen: dict[str, int] = {}
        for i, p in enumerate(self.principles):
            if p.id in seen:
                raise _FieldError(("principles", i, "id"), f"duplicate principle id {p.id!r} (first used by principles[{seen[p.id]}])")
            seen[p.id] = i
        for i, ex in enumerate(self.examples):
            if ex.principle is not None and ex.principle not in seen:
                raise _FieldError(("examples", i, "principle"), f"unknown principle id {ex.principle!r}; known: {sorted(seen)}")
        return self

    # -- identity ---------------------------------------------------------
    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the content: comments and formatting don't change it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.hash[:12]

    # -- lookup and sampling ---------------------------------------------
    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise UnknownPrincipleError(principle_id, [p.id for p in self.principles])

    def sample_principles(self, k: int, *, seed: int | str, replace: bool = False) -> list[Principle]:
        """Draw k principles by weight, reproducibly: the same seed gives the same draw on any machine.

        `seed` may be a string (e.g. f"{run_seed}:{row_id}:{round}") so each row gets its own stream
        without sharing an RNG across concurrent workers.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not replace and k > len(self.principles):
            raise ValueError(f"cannot draw {k} distinct principles from {len(self.principles)}")
        rng = random.Random(_stable_seed(seed))
        pool = list(self.principles)
        chosen: list[Principle] = []
        for _ in range(k):
            pick = rng.choices(pool, weights=[p.weight for p in pool], k=1)[0]
            chosen.append(pick)
            if not replace:
                pool.remove(pick)
        return chosen

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hash": self.hash,
            "description": self.description,
            "principles": [p.id for p in self.principles],
            "examples": len(self.examples),
        }


def _stable_seed(seed: int | str) -> int:
    # Python's hash() is salted per process; derive the seed from sha256 instead.
    return int.from_bytes(hashlib.sha256(str(seed).encode("utf-8")).digest()[:8], "big")


# -- errors -----------------------------------------------------------------


class UnknownPrincipleError(CaiError, KeyError):
    def __init__(self, principle_id: str, known: Iterable[str]):
        self.principle_id = principle_id
        self.known = list(known)
        super().__init__(principle_id)

    def __str__(self) -> str:
        return f"unknown principle id {self.principle_id!r}; this constitution has: {', '.join(self.known)}"


class _FieldError(ValueError):
    """Raised inside validators to attach a precise location to a cross-field error."""

    def __init__(self, loc: tuple[str | int, ...], msg: str):
        self.loc = loc
        self.msg = msg
        super().__init__(msg)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a constitution file."""

    path: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConstitutionError(CaiError, ValueError):
    """A constitution file that can't be used; `problems` lists every issue found."""

    def __init__(self, path: str, problems: list[Problem]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# -- parsing ----------------------------------------------------------------


def parse_constitution(text: str, *, source: str = "<string>") -> Constitution:
    data, lines, problems = _parse_yaml(text, source)
    if problems:
        raise ConstitutionError(source, problems)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConstitutionError(source, [Problem(source, 1, "", f"expected a mapping with name, description and principles; the file is {kind}")])
    return validate_constitution_data(data, lines, source)


def validate_constitution_data(data: dict[str, Any], lines: dict[tuple, int], source: str) -> Constitution:
    """Validate parsed content; `lines` maps field locations to file lines for the error messages."""
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc, msg = tuple(err["loc"]), err["msg"]
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _FieldError):
                loc, msg = ctx_err.loc, ctx_err.msg
            problems.append(Problem(source, _line_for(lines, loc), _dotted(loc), _friendly(err["type"], msg, err.get("input"))))
        raise ConstitutionError(source, problems) from None


def _friendly(kind: str, msg: str, value: Any) -> str:
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        return "unknown key (allowed keys are listed in the README's constitution format section)"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_type":
        return f"expected text, got {type(value).__name__} {value!r}; quote it if it is meant as text"
    return msg.removeprefix("Value error, ")


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(lines: dict[tuple, int], loc: tuple[str | int, ...]) -> int | None:
    # The error may point at a key that is absent (missing field): walk up to the nearest known node.
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), None)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int], list[Problem]]:
    """Compose YAML keeping the line of every node, and refuse duplicate keys (PyYAML keeps the last)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        return None, {}, [Problem(source, line, "", f"YAML syntax error: {e.problem}")]
    except yaml.YAMLError as e:
        return None, {}, [Problem(source, None, "", f"YAML error: {e}")]
    if root is None:
        return None, {}, []
    lines: dict[tuple, int] = {}
    problems: list[Problem] = []
    constructor = yaml.SafeLoader("")

    def build(node: yaml.Node, loc: tuple) -> Any:
        lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                if key in out:
                    problems.append(Problem(source, key_node.start_mark.line + 1, _dotted(loc + (key,)), "duplicate key"))
                    continue
                out[key] = build(value_node, loc + (key,))
                lines[loc + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(child, loc + (i,)) for i, child in enumerate(node.value)]
        return constructor.construct_object(node, deep=True)

    return build(root, ()), lines, problems
