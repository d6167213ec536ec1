"""What `cai generate sft` and `cai generate prefs` share: settings, the resumable chunk loop (the
judge through `cai.judge.Judge`, with its cache), progress and outputs. Each command supplies which prompts are still
to do and what to do with a chunk of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cai import __version__
from cai.constitution import Constitution, find_constitution, load_constitution
from cai.engine_logs import POLICY_ENGINE_LOG
from cai.files import write_text_atomic
from cai.generate.outputs import write_rows
from cai.judge import Judge, JudgeSettings, open_judge
from cai.judge_cache import default_cache_path
from cai.judge_client import JudgeError, JudgeItemError
from cai.models import DEFAULT_MODEL
from cai.pinning import pin_settings
from cai.policy import load_policy
from cai.policy_servers import PolicyServers
from cai.progress import progress_bar
from cai.prompts import Prompt, load_prompts
from cai.rowlog import RowLog
from cai.samples import SamplingConfig

logger = logging.getLogger(__name__)


PolicyBackend = Literal["auto", "vllm", "transformers"]
"""How a process samples its models' answers in itself (`cai.policy.load_policy`): vLLM, transformers, or auto (vLLM when
installed). What `cai run` takes: it samples the models it trains, which no server serves."""

JobPolicyBackend = Literal["auto", "vllm", "transformers", "openai"]
"""How `cai generate` and `cai eval` sample: as PolicyBackend, or from OpenAI-compatible servers (`cai.policy_servers`)."""

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
    policy_backend: JobPolicyBackend = Field(default=DEFAULT_POLICY_BACKEND, description="Policy sampling: vllm, transformers, "
                                          "auto (vLLM when installed), or openai (the servers at --policy-url).")
    policy_servers: PolicyServers = Field(default_factory=PolicyServers, description="The policy's servers (--policy-backend openai).")
    judge_cache: Path | None = Field(default=None, description="SQLite cache of judge answers (default "
                                     "~/.cache/cai/judge-cache.sqlite); reruns don't ask twice.")
    shard: str | None = Field(default=None, description="Make only share I of N of the job's rows, as I/N, counted from 1 "
                              "(1/4 ... 4/4), each share on its own machine with its own --out: prompt i of the seeded, limited "
                              "list goes to share i mod N + 1, its rows as the whole job makes them. "
                              "`cai generate merge` joins the shares.")

    @property
    def sampled_policy(self) -> str:
        """The policy's name as it is sampled (rows' provenance): the servers' name for it, else --policy."""
        return self.policy_servers.policy_model or self.policy

    @model_validator(mode="after")
    def _servers_for_openai(self) -> GenerationJob:
        self.policy_servers.check_backend(self.policy_backend)
        return self

    @field_validator("shard")
    @classmethod
    def _one_of_n(cls, given: str | None) -> str | None:
        if given is None:
            return None
        index, _, count = given.partition("/")
        if not (index.strip().isdigit() and count.strip().isdigit()):
            raise PydanticCustomError("shard", "--shard {given}: expected I/N, two whole numbers such as 1/4", {"given": given})
        if not 1 <= int(index) <= int(count):
            raise PydanticCustomError("shard", "--shard {given}: I must be from 1 to N (the shares of 2 machines are 1/2 and "
                                      "2/2)", {"given": given})
        return f"{int(index)}/{int(count)}"

    TRANSIENT: ClassVar[tuple[str, ...]] = ("out", "judge_url", "judge_cache", "chunk_size", "policy_backend", "policy_servers",
                                            "judge_retries")
    """Settings a resumed run may change (where it runs, not what it makes): left out of run.json (a served policy's
    name, `policy_model`, is pinned apart from its servers)."""


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
                   step: Callable[[Chunk], Awaitable[int]]) -> tuple[dict, RowLog]:
    """Load, take the job's shard of the prompts if it has one, resume, loop over chunks (`step` appends rows,
    returns its failures). The generator then writes its outputs from the rows.

    Returns the summary and the (closed) log, whose iteration reads the last row of each id from the file, one at a time.
    """
    constitution_path = find_constitution(job.constitution)
    constitution = load_constitution(constitution_path)
    prompts = load_prompts(job.prompts, limit=job.limit, seed=job.seed, shuffle=True)
    served = {"policy_model": job.policy_servers.policy_model} if job.policy_servers.policy_model else {}
    pin_settings(job.out, job, exclude=job.TRANSIENT, extra={"constitution_hash": constitution.hash, **served})
    job_prompts = len(prompts)
    if job.shard is not None:
        prompts = shard_prompts(prompts, job.shard)
        write_text_atomic(job.out / SHARD_FILE, json.dumps({"generator": name, "shard": job.shard, "job_prompts": job_prompts,
                                                            "prompt_ids": [p.id for p in prompts]}))
    timers = Timers()
    with RowLog.open(job.out / "progress.jsonl") as log:
        todo = pending(log, prompts)
        logger.info("%s: %d prompts, %d already done, %d to go", name, len(prompts), len(prompts) - len(todo), len(todo))
        failures = 0
        if todo:
            policy = load_policy(job.policy, backend=job.policy_backend, batch_size=job.chunk_size,
                                 engine_log=job.out / POLICY_ENGINE_LOG, servers=job.policy_servers)
            try:
                failures = asyncio.run(_loop(job, name, constitution_path, constitution, todo, policy, log, timers, step))
            finally:
                policy.close()
    summary = {"prompts": len(prompts), "failed_this_run": failures, "seconds": {k: round(v, 1) for k, v in timers.seconds.items()}}
    if job.shard is not None:
        summary.update(shard=job.shard, job_prompts=job_prompts)
    return summary, log


SHARD_FILE = "shard.json"
"""What a shard's folder holds beside run.json: its generator, I/N, the job's prompt count and its own prompts' ids in order."""


def shard_prompts(prompts: list[Prompt], shard: str) -> list[Prompt]:
    """Share I/N of the job's prompt list: those at positions i with i mod N == I - 1, in the list's order."""
    index, count = map(int, shard.split("/"))
    return prompts[index - 1::count]


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


def write_outputs(rows: Iterable[dict], out: Path, name: str, select: Callable[[dict], bool] | None = None,
                  each: Callable[[dict], None] | None = None) -> dict:
    """The finished rows of a log (status ok, those `select` keeps; all of them by default) as OUT/NAME.jsonl and a
    `datasets` folder OUT/dataset, read once, one row at a time; `each` sees every row on the way (a summary's figures).
    Returns the summary's `rows` (how many) and `output` (the JSONL file)."""
    def kept() -> Iterator[dict]:
        for row in rows:
            if each is not None:
                each(row)
            if row.get("status") == "ok" and (select is None or select(row)):
                yield row

    path = out / f"{name}.jsonl"
    return {"rows": write_rows(kept(), path, out / "dataset"), "output": str(path)}
