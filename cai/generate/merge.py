"""`cai generate merge`: one dataset from the shards of a job (`cai generate sft|prefs --shard I/N`, one per machine).

Prompt i of the job's seeded, limited list went to shard i mod N + 1, and its rows are those the unsharded job makes,
so the shards' rows, put back in the job's order, are the unsharded job's. The merge refuses, naming the folders:
shards of different jobs (their run.json differ in more than `shard`), a shard missing or given twice, a shard not
finished (with how many prompts it lacks and the command that finishes it), and a row id found in two shards. It then
writes what the generator writes (NAME.jsonl, dataset/, its other outputs, summary.json with the rows of each shard)
into a temporary folder beside --out, renamed to --out at the end: a merge that fails leaves nothing that looks
complete. The shards' folders are only read, each shard's log a row at a time: the merge holds the rows' ids, not the
rows.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.cli_options import flags_for
from cai.errors import CaiError
from cai.generate import prefs, sft
from cai.generate.common import SHARD_FILE, GenerationJob
from cai.pinning import PIN_FILE
from cai.rowlog import RowLog

logger = logging.getLogger(__name__)


class MergeError(CaiError, ValueError):
    """Shard folders that do not make one whole job, or an --out that is taken; the message names the folders."""


@dataclass(frozen=True)
class _Generator:
    """What the merge needs of a generator: its settings, when a prompt is finished, a row's prompt, its outputs."""

    job: type[GenerationJob]
    done_prompts: Callable[[Iterable[dict]], set[str]]
    prompt_of: Callable[[dict], str]
    write: Callable[[Any, Iterable[dict], dict], dict]


GENERATORS = {
    "sft": _Generator(sft.SftJob, sft.done_prompts, lambda row: row["id"], sft.write_sft),
    "prefs": _Generator(prefs.PrefsJob, prefs.done_prompts, lambda row: row["prompt_id"], prefs.write_prefs),
}


@dataclass
class Shard:
    """One shard's folder as the merge reads it."""

    folder: Path
    generator: str
    index: int
    count: int
    job_prompts: int
    prompt_ids: list[str]
    settings: dict[str, Any]
    """Its run.json: the job's settings, its shard and the constitution's hash."""
    log: RowLog
    """Its progress.jsonl, read only: the last row of each id."""
    done: set[str] = field(default_factory=set)
    """The prompts whose rows are finished (`scan`)."""
    ok_rows: int = 0
    """Its rows with status ok (`scan`)."""
    rows_of: dict[str, list[str | int]] = field(default_factory=dict)
    """Each prompt's row ids, in the log's order (`scan`)."""

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count}"

    def scan(self, gen: _Generator) -> None:
        """Read the log once, a row at a time, for which prompts are done, its rows with status ok, and each prompt's ids."""
        def rows() -> Iterator[dict]:
            for row in self.log:
                self.ok_rows += row.get("status") == "ok"
                self.rows_of.setdefault(gen.prompt_of(row), []).append(row["id"])
                yield row

        self.done = gen.done_prompts(rows())

    def prompt_rows(self) -> Iterator[dict]:
        """Its prompts' rows, prompt by prompt in its prompt order (each prompt's in the log's order), read one at a time."""
        return self.log.rows(row_id for prompt in self.prompt_ids for row_id in self.rows_of[prompt])


def read_shard(folder: Path) -> Shard:
    record, pinned = folder / SHARD_FILE, folder / PIN_FILE
    if not record.is_file() or not pinned.is_file():
        raise MergeError(f"{folder}: not a shard's folder (no {SHARD_FILE} or {PIN_FILE}); `cai generate sft|prefs --shard I/N "
                         "--out FOLDER` makes one")
    try:
        info, settings = json.loads(record.read_text(encoding="utf-8")), json.loads(pinned.read_text(encoding="utf-8"))
        index, count = map(int, info["shard"].split("/"))
        shard = Shard(folder, info["generator"], index, count, info["job_prompts"], info["prompt_ids"], settings,
                      RowLog.read(folder / "progress.jsonl"))
    except (json.JSONDecodeError, KeyError, ValueError, AttributeError) as e:
        raise MergeError(f"{folder}: {SHARD_FILE} or {PIN_FILE} is not as cai writes it ({e})") from None
    if shard.generator not in GENERATORS:
        raise MergeError(f"{record}: generator {shard.generator!r} is not one of {', '.join(GENERATORS)}")
    return shard


def merge_shards(folders: list[Path], out: Path, *, keep_unrevised: bool = False) -> dict:
    """Check that `folders` are every shard of one finished job, each row in one of them; write the job's outputs to `out`.

    `keep_unrevised` is `cai generate sft --keep-unrevised` (which rows train SFT); prefs has no such choice.
    Returns the summary (also in OUT/summary.json): the generator's, with the rows each shard gave.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out}: already exists and is not an empty folder; choose a new one")
    if not folders:
        raise MergeError("no shard folders given: name every shard's --out folder")
    shards = [read_shard(Path(f)) for f in folders]
    _check_one_job(shards)
    by_index = _check_all_present(shards)
    gen = GENERATORS[shards[0].generator]
    settings = {k: v for k, v in shards[0].settings.items() if k in gen.job.model_fields and k != "shard"}
    if "keep_unrevised" in gen.job.model_fields:
        settings["keep_unrevised"] = keep_unrevised
    elif keep_unrevised:
        raise MergeError(f"--keep-unrevised is a choice of sft's rows; these are shards of a {shards[0].generator} job")
    for shard in shards:
        shard.scan(gen)
    _check_finished(shards, gen, settings)
    _check_each_row_once(shards)

    rows = _JobRows(by_index, shards[0].job_prompts)
    summary = {"prompts": shards[0].job_prompts,
               "shards": [{"shard": s.name, "folder": str(s.folder), "rows": s.ok_rows} for s in sorted(shards, key=lambda s: s.index)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        summary = gen.write(gen.job.model_validate({**settings, "out": tmp}), rows, summary)
        summary["output"] = str(out / Path(summary["output"]).name)  # where it will be once renamed
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("merged %d shards: %d rows in %s", len(shards), summary["rows"], out)
    return summary


def _check_one_job(shards: list[Shard]) -> None:
    first = shards[0]
    for other in shards[1:]:
        keys = set(first.settings) | set(other.settings)
        diff = sorted(k for k in keys if k != "shard" and first.settings.get(k) != other.settings.get(k))
        if other.generator != first.generator:
            diff.insert(0, f"generator: {first.generator} vs {other.generator}")
        elif other.count != first.count:
            diff.insert(0, f"shards: {first.count} vs {other.count}")
        elif other.job_prompts != first.job_prompts:
            diff.insert(0, f"prompts: {first.job_prompts} vs {other.job_prompts}")
        if diff:
            shown = "; ".join(d if ": " in d else f"{d}: {first.settings.get(d)!r} vs {other.settings.get(d)!r}" for d in diff)
            raise MergeError(f"{first.folder} and {other.folder} are shards of different jobs ({shown}); merge the shards of one job")


def _check_all_present(shards: list[Shard]) -> dict[int, Shard]:
    by_index: dict[int, Shard] = {}
    count, total = shards[0].count, shards[0].job_prompts
    for shard in shards:
        if shard.index in by_index:
            raise MergeError(f"shard {shard.name} is given twice: {by_index[shard.index].folder} and {shard.folder}")
        if len(shard.prompt_ids) != len(range(shard.index - 1, total, count)):
            raise MergeError(f"{shard.folder}: {SHARD_FILE} lists {len(shard.prompt_ids)} prompts, but shard {shard.name} of "
                             f"{total} has {len(range(shard.index - 1, total, count))}")
        by_index[shard.index] = shard
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise MergeError(f"shard {', '.join(missing)} missing: the job has {count} shards and all are needed (given: "
                         f"{', '.join(f'{s.name} in {s.folder}' for s in shards)})")
    return by_index


def _check_finished(shards: list[Shard], gen: _Generator, settings: dict[str, Any]) -> None:
    unfinished = []
    for shard in shards:
        lacking = sum(p not in shard.done for p in shard.prompt_ids)
        if lacking:
            job = gen.job.model_validate({**settings, "shard": shard.name, "out": shard.folder})
            command = shlex.join(["cai", "generate", shard.generator, *flags_for(job)])
            unfinished.append(f"{shard.folder} (shard {shard.name}) lacks the rows of {lacking} of its {len(shard.prompt_ids)} "
                              f"prompts; finish it with: {command}")
    if unfinished:
        raise MergeError("not every shard is finished (rerun its command, with the options that say where it ran, such as "
                         "--judge-url, as they were): " + "; ".join(unfinished))


def _check_each_row_once(shards: list[Shard]) -> None:
    seen: dict[str | int, Shard] = {}  # ids only: a row is read when one is found twice
    for shard in shards:
        for row_id in shard.log.ids():
            if row_id in seen:
                first = seen[row_id]
                how = "the same row" if next(first.log.rows([row_id])) == next(shard.log.rows([row_id])) else "with different content"
                raise MergeError(f"row {row_id} is in both {first.folder} and {shard.folder} ({how}); each row belongs "
                                 "to one shard: a shard's folder holds rows of another")
            seen[row_id] = shard


@dataclass
class _JobRows:
    """The shards' rows in the unsharded job's order, read from their logs one at a time (each iteration anew): prompt i
    of the job is prompt i // N of shard i mod N + 1, its rows in that shard's log order."""

    by_index: dict[int, Shard]
    job_prompts: int

    def __iter__(self) -> Iterator[dict]:
        count = len(self.by_index)
        streams = {index: shard.prompt_rows() for index, shard in self.by_index.items()}
        for position in range(self.job_prompts):
            shard = self.by_index[position % count + 1]
            for _ in shard.rows_of[shard.prompt_ids[position // count]]:
                yield next(streams[shard.index])
