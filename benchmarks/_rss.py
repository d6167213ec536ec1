"""Memory and CPU of a process tree sampled through a long benchmark run, and the slope that says whether memory levels off.

`TreeSampler(pid, every)` samples, on a thread, the resident memory of the process and each of its descendants every
`every` seconds (with an optional `progress()` figure, e.g. rows written, beside each sample) and keeps the last CPU
times seen of every process of the tree. Besides RSS, each sample has the anonymous memory (RSS less its file-backed
and shared pages: the heap), which a busy machine reclaiming mapped library pages does not move, so a leak shows
in it even when RSS falls. `slope(xs, ys)` is the least-squares slope; `second_half_slope` fits it over
the second half of the samples, where start-up allocation is over and only growth remains. `print_report` prints a
benchmark's JSON report and writes it to a file when one is named.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import psutil


class TreeSampler:
    def __init__(self, pid: int, every: float = 5.0, progress: Callable[[], float] | None = None,
                 role: Callable[[psutil.Process, bool], str] | None = None):
        self.pid, self.every, self.progress = pid, every, progress
        self.role = role or (lambda p, is_root: "root" if is_root else "children")
        self.samples: list[dict] = []
        self.cpu_seconds: dict[int, float] = {}  # pid -> user + system seconds, last seen
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> dict | None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        by_role: dict[str, float] = {}
        anon: dict[str, float] = {}
        for p in procs:
            try:
                with p.oneshot():
                    mem = p.memory_info()
                    cpu = p.cpu_times()
                    name = self.role(p, p.pid == self.pid)
            except psutil.NoSuchProcess:
                continue
            by_role[name] = by_role.get(name, 0.0) + mem.rss / 2**20
            anon[name] = anon.get(name, 0.0) + (mem.rss - mem.shared) / 2**20
            self.cpu_seconds[p.pid] = cpu.user + cpu.system
        if not by_role or not sum(by_role.values()):
            return None  # exited: a zombie has no memory
        s = {"t_s": round(time.monotonic() - self.started, 1), "rss_mib": round(sum(by_role.values()), 1),
             **{f"rss_mib_{k}": round(v, 1) for k, v in sorted(by_role.items())},
             "anon_mib": round(sum(anon.values()), 1), **{f"anon_mib_{k}": round(v, 1) for k, v in sorted(anon.items())}}
        if self.progress is not None:
            s["progress"] = self.progress()
        self.samples.append(s)
        return s


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than 2 distinct xs)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def second_half_slope(samples: list[dict], x: str, y: str, scale: float = 1.0) -> float | None:
    """Slope of samples[y] over samples[x] across the second half of the run (by x), times `scale` (e.g. 1000 rows)."""
    if not samples:
        return None
    mid = (samples[0][x] + samples[-1][x]) / 2
    half = [s for s in samples if s[x] >= mid and y in s]
    k = slope([s[x] for s in half], [s[y] for s in half])
    return None if k is None else round(k * scale, 3)


def print_report(report: dict, out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)
