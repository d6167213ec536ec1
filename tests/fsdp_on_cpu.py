"""cai under accelerate's FSDP on CPU processes, for the tests:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_on_cpu.py train sft ...        # a cai command
        tests/fsdp_on_cpu.py SCRIPT.py ARGS...    # or a script (the crash-and-resume tests)

accelerate takes its FSDP path only on accelerator devices (its state treats several CPU processes as
plain DDP, whatever the config says), while torch's FSDP2 itself shards over gloo on CPU. This launcher
marks the CPU launch as a GPU launch before cai builds its `Accelerator`, so accelerate applies FSDP2
(`fully_shard` per decoder layer, then the root) from the config exactly as on GPUs; everything after
that is the real cai code. The run's summary.json records the distributed type it ran under.
"""

import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

if __name__ == "__main__":
    if PartialState(cpu=True).num_processes > 1:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # what AcceleratorState reads
    if sys.argv[1].endswith(".py"):
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        from cai.cli import app

        app(args=sys.argv[1:], prog_name="cai")


def launch(args: list[str], *, fsdp: bool, processes: int = 2) -> list[str]:
    """The command that runs `cai ARGS` (or a script) under `processes` CPU processes: accelerate's FSDP
    with examples/accelerate/fsdp.yaml through this launcher, or torchrun's plain DDP."""
    from pathlib import Path

    if fsdp:
        config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp.yaml"
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(processes),
                __file__, *args]
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    return [*head, *args] if args[0].endswith(".py") else [*head, "-m", "cai.cli", *args]


def cpu_env() -> dict[str, str]:
    import os

    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def run_ok(cmd: list[str]) -> None:
    """Run a `launch` command (or any) with `cpu_env`; fails with the end of its stderr unless it succeeds."""
    import subprocess

    done = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


CRASHING_RL_RUN = '''
import importlib, json, sys
from pathlib import Path
from cai.train.rewards import RuleScorer
from cai.train.rl.build import build_rl_trainer
from cai.train.settings import pin_trainer_settings

job_cls, trainer_cls = (getattr(importlib.import_module(m), n) for m, n in (a.split(":") for a in sys.argv[3:5]))
cfg = job_cls(**json.loads(Path(sys.argv[1]).read_text()))
rule, calls = RuleScorer(cfg.reward), {"n": 0}

def crashing(prompts, responses, *, first_row=0):  # every process crashes while scoring the same iteration
    calls["n"] += 1
    if calls["n"] == int(sys.argv[2]):
        raise RuntimeError("simulated crash")
    return rule(prompts, responses, first_row=first_row)

pin_trainer_settings(cfg, Path(cfg.out))
trainer = build_rl_trainer(trainer_cls, cfg, scorer=crashing)
try:
    trainer.train()
finally:
    trainer.close()
'''


def crash_in_iteration(tmp_path, settings: dict, out, iteration: int, job: str, trainer: str, *, fsdp: bool) -> None:
    """A launch (as `launch`) of an RL trainer on `settings` (a rule reward) whose every process raises while scoring
    `iteration`, writing to `out`; fails unless it crashed there. `job` and `trainer` are "module:Class" names."""
    import json
    import subprocess

    (tmp_path / "crash.json").write_text(json.dumps({**settings, "out": str(out)}))
    (tmp_path / "crash.py").write_text(CRASHING_RL_RUN)
    crashed = subprocess.run(launch([str(tmp_path / "crash.py"), str(tmp_path / "crash.json"), str(iteration), job, trainer],
                                    fsdp=fsdp), env=cpu_env(), capture_output=True, text=True, check=False)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]


def one_and_two_processes(tmp_path, command: str, settings: dict, *, fsdp: bool,
                          crash: tuple[int, str, str] | None = None, two_only: tuple[str, ...] = ()) -> list:
    """`cai train COMMAND` on `settings` (each a flag; lists comma-joined) in one process (OUT `one`) and in 2 under
    `launch` (`two`), whose summary must name the launch it ran under; with `crash` = (iteration, "module:Job",
    "module:Trainer"), also a 2-process run that crashes in that iteration (`crash_in_iteration`, the iterations
    before it logged) and is rerun with the same command (`crashy`). `two_only`: flags of the 2-process run alone (ones
    that must not change what it logs). Returns the output folders in that order."""
    import json
    import sys

    flags = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}" for k, v in settings.items()]
    outs = [tmp_path / "one", tmp_path / "two"]
    run_ok([sys.executable, "-m", "cai.cli", "train", command, *flags, "--out", str(outs[0])])
    run_ok([*launch(["train", command, *flags, *two_only], fsdp=fsdp), "--out", str(outs[1])])
    summary = json.loads((outs[1] / "summary.json").read_text())
    assert (summary["distributed"], summary["sharded"]) == (("FSDP", True) if fsdp else ("MULTI_CPU", False))
    if crash is not None:
        iteration, job, trainer = crash
        outs.append(tmp_path / "crashy")
        crash_in_iteration(tmp_path, settings, outs[2], iteration, job, trainer, fsdp=fsdp)
        assert len((outs[2] / "metrics.jsonl").read_text().splitlines()) == iteration - 1
        run_ok([*launch(["train", command, *flags], fsdp=fsdp), "--out", str(outs[2])])
    return outs
