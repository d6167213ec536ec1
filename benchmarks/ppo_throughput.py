"""PPO throughput and memory: cai's PPO (`cai.train.rl.ppo`) against TRL's (`trl.experimental.ppo`), as JSON.

For each model, one reward model (the policy with a seeded one-output score head) and one prompt file
are made, then `_cai_ppo.py` and `_trl_ppo.py` run as subprocesses, one at a time, with the same batch
size, minibatches, response length, PPO epochs, iterations, threads, seed and LoRA (r=8, alpha=16,
all-linear; the reference is the adapter disabled in both). The runs go in ABBA order (cai, trl, trl,
cai with `--repeats 2`) so drift and noise on the machine show in the kept runs.

Per trainer: tokens/s (non-pad query tokens + response tokens up to and including EOS, per iteration,
first iteration dropped as warm-up), peak RSS (`ru_maxrss` when the last iteration returns), RSS after
loading (every weight read once), the increase during training, and the library floor (RSS once torch
and transformers' model classes are imported, before any trainer code: ~400 MiB here, which no
transformers-based trainer can go under). Per model: `speedup` = cai tokens/s / TRL tokens/s,
`memory_ratio` = cai peak RSS / TRL peak RSS, `memory_above_floor_ratio` the same on peak minus floor,
`train_increase_ratio` on the training increase, and `meets_targets` against the targets (speedup >= 1.5,
memory_ratio <= 0.6; judged on the raw peaks).

Before each run it waits (up to `--max-wait` seconds) until the other processes on the machine use
less than `--quiet-cpu` percent of the CPU; it records `load_before` (os.getloadavg()), whether the
machine was quiet, the CPU cores other processes used during the run (`other_cpu_cores`) and the share
of CPU time the hypervisor stole (`steal_share`), which no process list shows.

    .venv/bin/python benchmarks/ppo_throughput.py --models tiny --save
    .venv/bin/python benchmarks/ppo_throughput.py --models smollm2-135m-instruct --save
    .venv/bin/python benchmarks/ppo_throughput.py                       # both, JSON to stdout only
    .venv/bin/python benchmarks/ppo_throughput.py --models smollm2-135m-instruct --iterations 6 --save --tag iter6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _ppo_common import DEFAULT_PROMPTS, PHASES, make_reward_model  # noqa: E402

TARGETS = {"speedup": 1.5, "memory_ratio": 0.6}
SCRIPTS = {"cai": HERE / "_cai_ppo.py", "trl": HERE / "_trl_ppo.py"}


def log(msg: str) -> None:
    print(f"[ppo_throughput] {msg}", file=sys.stderr, flush=True)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds spent by everything on the machine since boot, CPU seconds stolen by the hypervisor)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0), getattr(t, "steal", 0.0)


def other_processes(window_s: float = 3.0, top: int = 3) -> tuple[float, list[str]]:
    """(percent of one core used by other processes over `window_s`, the busiest of them)."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(window_s)
    usage = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:120]
        except psutil.Error:
            continue
        usage.append((pct, f"{pct:.0f}% pid {p.pid}: {cmd}"))
    usage.sort(reverse=True)
    return sum(u for u, _ in usage), [line for u, line in usage[:top] if u >= 1]


def wait_for_quiet(max_wait_s: float, quiet_cpu: float) -> dict:
    """Wait until other processes use under `quiet_cpu` percent of a core; give up after `max_wait_s`."""
    started = time.monotonic()
    while True:
        used, busiest = other_processes()
        waited = time.monotonic() - started
        if used < quiet_cpu:
            return {"quiet": True, "waited_s": round(waited, 1), "other_cpu_pct_before": round(used, 1)}
        if waited >= max_wait_s:
            log(f"machine still busy after {waited:.0f}s ({used:.0f}% CPU elsewhere); measuring anyway: {busiest}")
            return {"quiet": False, "waited_s": round(waited, 1), "other_cpu_pct_before": round(used, 1), "busiest": busiest}
        log(f"machine busy ({used:.0f}% CPU elsewhere), waiting: {busiest}")
        time.sleep(20)


def run_trainer(script: Path, flags: list[str]) -> tuple[dict, float, float]:
    """Run one benchmark script; -> (its JSON, CPU cores used by other processes, share of CPU time stolen)."""
    cmd = [sys.executable, str(script), *flags]
    log(f"running {script.name}: {' '.join(cmd)}")
    (busy0, steal0), wall0 = cpu_seconds(), time.monotonic()
    self0, child0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    (busy1, steal1), wall1 = cpu_seconds(), time.monotonic()
    self1, child1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} exited with {proc.returncode}: {' '.join(cmd)}")
    ours = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in ((self0, self1), (child0, child1)))
    other_cores = max(0.0, (busy1 - busy0 - ours) / (wall1 - wall0))
    steal = (steal1 - steal0) / ((wall1 - wall0) * (os.cpu_count() or 1))
    return json.loads(proc.stdout.strip().splitlines()[-1]), other_cores, steal


def resolve_policy(name: str, tmp: Path) -> str:
    if name == "tiny":
        from cai.tiny import build_tiny_model

        return str(build_tiny_model(tmp / "tiny", seed=0))
    from cai.models import resolve_model

    return resolve_model(name).path


def build_reward_model(policy: str, folder: Path, seed: int) -> str:
    """The policy with a seeded one-output score head, its pad id set, and the tokenizer (cai's scorer reads it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    make_reward_model(policy, str(folder), pad, seed)
    tokenizer.save_pretrained(folder)
    return str(folder)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarise(runs: list[dict], targets: dict[str, float] = TARGETS, source_key: str = "cai_ppo_source") -> dict:
    """Per trainer means of `runs`, cai against TRL (speedup, memory ratios) and whether `targets` are met; `source_key`
    names the field in which the cai runs record the version of its sources they measured."""
    by = {t: [r for r in runs if r["trainer"] == t] for t in ("cai", "trl")}
    out: dict = {}
    for t, rs in by.items():
        increase = [r["peak_rss_mib"] - r["rss_after_load_mib"] for r in rs]
        out[t] = {
            "tokens_per_s": round(mean([r["tokens_per_s"] for r in rs]), 2),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
            "seconds_per_iteration": round(mean([s for r in rs for s in r["seconds_per_iteration"]]), 3),
            "peak_rss_mib": round(mean([r["peak_rss_mib"] for r in rs]), 1),
            "peak_rss_mib_runs": [r["peak_rss_mib"] for r in rs],
            "rss_after_load_mib": round(mean([r["rss_after_load_mib"] for r in rs]), 1),
            "train_increase_mib": round(mean(increase), 1),
            "train_increase_mib_runs": [round(x, 1) for x in increase],
            "rss_floor_mib": round(mean([r["rss_floor_mib"] for r in rs]), 1),
            "peak_above_floor_mib": round(mean([r["peak_rss_mib"] - r["rss_floor_mib"] for r in rs]), 1),
            "trainable_params": rs[0]["trainable_params"],
        }
        if all("phases_s" in r for r in rs):  # the iteration's parts, and what they leave out ("other")
            phases = {name: round(mean([r["phases_s"][name] for r in rs]), 3) for name in PHASES}
            out[t]["phases_s"] = {**phases, "other": round(out[t]["seconds_per_iteration"] - sum(phases.values()), 3)}
    cai, trl = out["cai"], out["trl"]
    speedup = cai["tokens_per_s"] / trl["tokens_per_s"]
    memory_ratio = cai["peak_rss_mib"] / trl["peak_rss_mib"]
    out["speedup"] = round(speedup, 3)
    out["speedup_per_pair"] = [round(c["tokens_per_s"] / t["tokens_per_s"], 3) for c, t in zip(by["cai"], by["trl"])]
    out["memory_ratio"] = round(memory_ratio, 3)
    increase = trl["train_increase_mib"]
    out["memory_above_floor_ratio"] = round(cai["peak_above_floor_mib"] / trl["peak_above_floor_mib"], 3)
    out["train_increase_ratio"] = round(cai["train_increase_mib"] / increase, 3) if increase > 0 else None
    out["targets"] = targets
    met = {"speedup": speedup >= targets["speedup"], "memory_ratio": memory_ratio <= targets["memory_ratio"]}
    out["meets_targets"] = {**met, "all": all(met.values())}
    out["quiet_runs"] = all(r["quiet"] for r in runs)
    # cai/train/rl/ changes under work: say which version(s) these runs measured.
    sources = {json.dumps(r[source_key], sort_keys=True) for r in by["cai"] if source_key in r}
    out[source_key] = [json.loads(x) for x in sorted(sources)]
    return out


def run_models(args: argparse.Namespace, prefix: str, scripts: dict[str, Path], extra_flags: dict[str, list[str]],
               summarise_runs) -> dict:
    """For each of `args.models`: the policy, its reward model and the 64 prompts, then `scripts` ("cai", "trl") run
    `args.repeats` times each in ABBA order with the shared flags plus `extra_flags[trainer]`; -> {model: summary},
    the summary `summarise_runs(runs, policy folder)` (called while the folder exists)."""
    models: dict = {}
    order = [("cai", "trl") if k % 2 == 0 else ("trl", "cai") for k in range(args.repeats)]
    with tempfile.TemporaryDirectory(prefix=f"{prefix}_") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
        for name in args.models:
            policy = resolve_policy(name, tmp)
            rm = build_reward_model(policy, tmp / f"rm-{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}", args.seed)
            iterations = args.iterations or (4 if name == "tiny" else 3)
            flags = ["--policy", policy, "--reward-model", rm, "--prompts", str(prompts), "--batch-size", str(args.batch_size),
                     "--mini-batches", str(args.mini_batches), "--response-length", str(args.response_length),
                     "--ppo-epochs", str(args.ppo_epochs), "--iterations", str(iterations), "--seed", str(args.seed),
                     "--threads", str(args.threads), "--lr", str(args.lr)]
            runs = []
            for trainer in [t for pair in order for t in pair]:
                quiet = wait_for_quiet(args.max_wait, args.quiet_cpu)
                load_before = [round(x, 2) for x in os.getloadavg()]
                result, other_cores, steal = run_trainer(scripts[trainer], flags + extra_flags[trainer])
                result.update(run=len(runs) + 1, load_before=load_before, other_cpu_cores=round(other_cores, 2),
                              steal_share=round(steal, 3), **quiet)
                log(f"{name} {trainer}: {result['tokens_per_s']} tokens/s, peak RSS {result['peak_rss_mib']} MiB "
                    f"(other processes {other_cores:.2f} cores)")
                runs.append(result)
            models[name] = {"policy": policy, "iterations": iterations, **summarise_runs(runs, policy), "runs": runs}
    return models


def print_report(report: dict, benchmark: str, args: argparse.Namespace) -> None:
    """Print `report` as JSON; with `--save` also write it to benchmarks/results/<benchmark>_<models>[_<tag>].json."""
    text = json.dumps(report, indent=2)
    print(text)
    if not args.save:
        return
    slug = "_".join(re.sub(r"[^A-Za-z0-9_.-]", "-", Path(m).name if "/" in m else m) for m in args.models)
    if args.tag:
        slug += "_" + re.sub(r"[^A-Za-z0-9_.-]", "-", args.tag)
    path = HERE / "results" / f"{benchmark}_{slug}.json"
    path.write_text(text + "\n")
    log(f"wrote {path}")


def add_run_args(ap: argparse.ArgumentParser, benchmark: str, *, batch_size: int, batch_help: str) -> None:
    """The flags `ppo_throughput.py` and `grpo_throughput.py` share."""
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"],
                    help="'tiny' (cai.tiny, built locally) or any name/folder cai.models.resolve_model takes")
    ap.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=1, help="passes over each batch (TRL's GRPO: num_iterations, mu)")
    ap.add_argument("--iterations", type=int, default=None, help="per run, first one warm-up (default: 4 for tiny, 3 otherwise)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each run (each run is alone on the machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--repeats", type=int, default=2, help="runs per trainer, in ABBA order (cai, trl, trl, cai, ...)")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine before each run")
    ap.add_argument("--quiet-cpu", type=float, default=20, help="'quiet' = other processes use under this percent of one core")
    ap.add_argument("--save", action="store_true", help=f"also write benchmarks/results/{benchmark}_<models>[_<tag>].json")
    ap.add_argument("--tag", default=None, help="suffix for the saved file's name (runs with other settings)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "ppo_throughput", batch_size=8, batch_help="rollouts per iteration")
    args = ap.parse_args(argv)

    import torch
    import trl

    report: dict = {
        "benchmark": "ppo_throughput",
        "settings": {"batch_size": args.batch_size, "mini_batches": args.mini_batches, "response_length": args.response_length,
                     "ppo_epochs": args.ppo_epochs, "threads": args.threads, "seed": args.seed, "lr": args.lr,
                     "lora": "r=8 alpha=16 all-linear", "temperature": 1.0, "kl_coef": 0.05, "kl_estimator": "k1",
                     "missing_eos_penalty": 1.0, "repeats": args.repeats},
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "trl": trl.__version__, "cuda": torch.cuda.is_available()},
        "models": {},
    }
    report["models"] = run_models(args, "ppo_throughput", SCRIPTS, {"cai": [], "trl": ["--lora"]},
                                   lambda runs, policy: summarise(runs))
    print_report(report, "ppo_throughput", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
