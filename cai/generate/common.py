"""What `cai generate sft` and `cai generate prefs` share: settings, the resumable chunk loop (the
judge through `cai.judge.Judge`, with its cache), progress and outputs. Each command supplies which prompts are still
to do and what to do with a chunk of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

from pydantic import Field

from cai import __version__
from cai.constitution import Constitution, find_constitution, load_constitution
from cai.engine_logs import POLICY_ENGINE_LOG
from cai.judge import Judge, JudgeSettings, open_judge
from cai.judge_cache import default_cache_path
from cai.judge_client import JudgeError, JudgeItemError
from cai.models import DEFAULT_MODEL
from cai.pinning import pin_settings
from cai.policy import SamplingConfig, load_policy
from cai.progress import progress_bar
from cai.prompts import Prompt, load_prompts
from cai.rowlog import RowLog

logger = logging.getLogger(__name__)


PolicyBackend = Literal["auto", "vllm", "transformers"]
"""How a job samples its models' answers (`cai.policy.load_policy`): vLLM, transformers, or auto (vLLM when installed)."""

DEFAULT_POLICY_BACKEND: PolicyBackend = "auto"


class GenerationJob(JudgeSettings):
    """Settings both generators share (each adds its own); pinned in OUT/run.json but for the transient ones.
    `cai generate sft|prefs` make their options from these fields."""

    prompts: str = Field(description="Prompt source: built-in set(s), JSONL or datasets folder; join with '+'.")
    out: Path = Field(description="Output folder: progress.jsonl (the resumable log), NAME.jsonl, dataset/, summary.json, "
                      "run.json. Rerun the same command to resume a killed run.")
    policy: str = Field(default=DEFAULT_MODEL, description="Model that writes the responses (folder, hub id or embedded name).")
    limit: int | None = Field(default=None, ge=0, description="Use only N prompts (after the seeded shuffle).")
    seed: int = Field(default=0, description="Seeds prompt order, principle draws and sampling.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Policy sampling.")
    chunk_size: int = Field(default=8, ge=1, description="Prompts per policy batch; rows are written per chunk.")
    policy_backend: PolicyBackend = Field(default=DEFAULT_POLICY_BACKEND, description="Policy sampling: vllm, transformers, or "
                                          "auto (vLLM when installed).")
    judge_cache: Path | None = Field(default=None, description="SQLite cache of judge answers (default "
                                     "~/.cache/cai/judge-cache.sqlite); reruns don't ask twice.")

    TRANSIENT: ClassVar[tuple[str, ...]] = ("out", "judge_url", "judge_cache", "chunk_size", "policy_backend", "judge_retries")
    """Settings a resumed run may change (where it runs, not what it makes): left out of run.json."""


@dataclass
class Chunk:
    """What a generator's chunk step gets: the chunk, and the run's shared parts."""

    prompts: list[Prompt]
    job: GenerationJob
    constitution: Constitution
    judge: Judge
    policy: Any
    log: RowLog
    timers: Timers


def run_generation(job: GenerationJob, name: str, *, pending: Callable[[RowLog, list[Prompt]], list[Prompt]],
                   step: Callable[[Chunk], Awaitable[int]],
                   select: Callable[[dict], bool] | None = None) -> tuple[dict, list[dict]]:
    """Load, resume, loop over chunks (`step` appends rows, returns its failures), write outputs: the finished
    rows that `select` keeps (all of them by default; the log keeps every row either way).

    Returns the summary and every row of the log (the last per id).
    """
    constitution_path = find_constitution(job.constitution)
    constitution = load_constitution(constitution_path)
    prompts = load_prompts(job.prompts, limit=job.limit, seed=job.seed, shuffle=True)
    pin_settings(job.out, job, exclude=job.TRANSIENT, extra={"constitution_hash": constitution.hash})
    timers = Timers()
    with RowLog.open(job.out / "progress.jsonl") as log:
        todo = pending(log, prompts)
        logger.info("%s: %d prompts, %d already done, %d to go", name, len(prompts), len(prompts) - len(todo), len(todo))
        failures = 0
        if todo:
            policy = load_policy(job.policy, backend=job.policy_backend, batch_size=job.chunk_size,
                                 engine_log=job.out / POLICY_ENGINE_LOG)
            try:
                failures = asyncio.run(_loop(job, name, constitution_path, constitution, todo, policy, log, timers, step))
            finally:
                policy.close()
        path, n_ok = write_outputs(log, job.out, name, select)
        rows = log.final_rows()
    summary = {"rows": n_ok, "prompts": len(prompts), "failed_this_run": failures, "output": str(path),
               "seconds": {k: round(v, 1) for k, v in timers.seconds.items()}}
    return summary, rows


async def _loop(job, name, constitution_path, constitution, todo, policy, log, timers, step) -> int:
    failures = 0
    async with open_judge(job, constitution=constitution, constitution_path=constitution_path, default_model=job.policy,
                          cache=job.judge_cache or default_cache_path(), log_path=job.out / "judge.log") as judge:
        with progress_bar("prompts") as bar:
            task = bar.add_task(f"{name}: prompts", total=len(todo))
            for start in range(0, len(todo), job.chunk_size):
                chunk = todo[start:start + job.chunk_size]
                failures += await step(Chunk(chunk, job, constitution, judge, policy, log, timers))
                bar.update(task, advance=len(chunk))
    return failures


@dataclass
class Timers:
    """Wall time per phase, for the share of time in policy generation vs judging."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def describe_error(err: JudgeError) -> str:
    return f"{err.kind}: {err.message}" if isinstance(err, JudgeItemError) else str(err)


def provenance(constitution: Constitution, judge: Judge, **extra) -> dict:
    return {"constitution_name": constitution.name, "constitution_hash": constitution.hash, "judge_model": judge.model,
            "cai_version": __version__, **extra}


def write_outputs(log: RowLog, out: Path, name: str, select: Callable[[dict], bool] | None = None) -> tuple[Path, int]:
    """The finished rows (status ok, one per id, those `select` keeps) as OUT/NAME.jsonl and a `datasets` folder OUT/dataset."""
    rows = [r for r in log.final_rows() if r.get("status") == "ok" and (select is None or select(r))]
    path = out / f"{name}.jsonl"
    write_rows(rows, path, out / "dataset")
    return path, len(rows)


def write_rows(rows: list[dict], path: Path, dataset_dir: Path) -> None:
    """`rows` as a JSONL file (written whole, then renamed) and, when there are any, a `datasets` folder; with
    none, an older folder is removed (a rerun may keep fewer rows, and a trainer must not read stale ones)."""
    import shutil

    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    if rows:
        Dataset.from_list(rows).save_to_disk(str(dataset_dir))
    elif dataset_dir.exists():
        shutil.rmtree(dataset_dir)
