"""The command line: --help everywhere, errors, and the demo end to end on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
import typer
from typer.testing import CliRunner

from cai.cli import app
from tests.conftest import JUDGE_KEY


def _command_paths(group: typer.Typer, prefix: tuple[str, ...] = ()):
    for cmd in group.registered_commands:
        yield prefix + (cmd.name or cmd.callback.__name__.replace("_", "-"),)
    for sub in group.registered_groups:
        yield prefix + (sub.name,)
        yield from _command_paths(sub.typer_instance, prefix + (sub.name,))


def test_every_command_has_help():
    paths = list(_command_paths(app))
    assert ("judge", "serve") in paths and ("constitution", "lint") in paths and ("demo",) in paths
    runner = CliRunner()
    for path in [()] + paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_python_dash_m_cai_is_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cai", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: cai train" in result.stdout


def test_version():
    from cai import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"cai {__version__}\n"


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    bad = tmp_path / "sft.yaml"
    bad.write_text("kind: sft\nmodel: m\ndata: d\nout: o\nlr: -1\n")
    result = CliRunner().invoke(app, ["train", "sft", "--config", str(bad)])
    assert result.exit_code == 1 and "sft.yaml: lr: Input should be greater than 0" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback for what the user can fix

    import cai.train.run

    def bug(cfg):
        raise ValueError("a bug, not the user's doing")

    monkeypatch.setattr(cai.train.run, "run_training", bug)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    result = CliRunner().invoke(app, ["train", "sft", "--model", "m", "--data", str(data), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, ValueError) and "a bug" in str(result.exception)


def test_eval_refuses_held_out_prompts_without_harmful_or_benign_before_loading_a_model(tmp_path):
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text('{"prompt": "How do I pick a lock?"}\n{"prompt": "Name a prime.", "kind": "benign"}\n')
    result = CliRunner().invoke(app, ["eval", "--policy", "no-such-model", "--reference", "no-such-model", "--prompts", str(prompts),
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert "held_out.jsonl: 1 of 2 held-out prompts have no 'kind'" in line and '"kind": "harmful"' in line, line
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_options_from_flags_and_config_merge_into_the_settings_model(tmp_path):
    """Flags override --config, a nested section given in part keeps the file's other values, and
    cai generate prefs samples at temperature 1.0 unless told otherwise."""
    from cai.cli_options import settings_command
    from cai.generate.prefs import PrefsJob

    seen = []
    command = settings_command(PrefsJob, seen.append)
    given = {name: None for name in command.__signature__.parameters}
    config = tmp_path / "prefs.yaml"
    config.write_text("prompts: mtbench\nout: o\nsamples: 3\nsampling:\n  top_p: 0.5\n")
    command(**{**given, "config": config, "max_new_tokens": 64, "samples": 4})
    command(**{**given, "prompts": "p", "out": "o"})
    (from_file, from_flags) = seen
    assert (from_file.samples, from_file.sampling.max_new_tokens, from_file.sampling.top_p) == (4, 64, 0.5)
    assert from_file.sampling.temperature == 1.0 and from_flags.sampling.temperature == 1.0


@pytest.mark.slow
def test_demo_config_runs_end_to_end_and_a_judge_that_cannot_revise_is_named(tiny_model_dir, judge, tmp_path, monkeypatch):
    """`cai demo` (what `make demo` runs) is `cai run` on the shipped demo config, here on the tiny model against the
    session's judge server (to save a second engine start). The tiny judge's random weights write empty revisions,
    which sft-data rejects, so no row was revised, SFT has nothing to train on and `cai demo` stops there saying why and
    what to do; the same config with sft_data.keep_unrevised and prefs.source both then runs every stage to the report."""
    import yaml

    from cai.run_config import DEMO_CONFIG, demo_config

    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    shown = CliRunner().invoke(app, ["demo", "--show-config"])
    assert shown.exit_code == 0 and shown.output == DEMO_CONFIG.read_text(encoding="utf-8")
    cfg = demo_config(out=str(tmp_path / "demo"), model=str(tiny_model_dir), judge_url=judge.url)
    assert (cfg.model, cfg.judge.model, cfg.judge.url, cfg.prefs.source) == (str(tiny_model_dir), str(tiny_model_dir), judge.url,
                                                                              "revisions")

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--model", str(tiny_model_dir), "--judge-url", judge.url])
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert ("sft: no SFT rows to train on: sft-data dropped all 48 of its rows because none was revised (the judge's revisions "
            "rejected: 48 of 48; empty: 48)") in line, line
    assert "sft_data.keep_unrevised: true" in line, line
    stages = {s["name"]: s["status"] for s in json.loads((tmp_path / "demo" / "stages.json").read_text())["stages"]}
    assert stages == {"prompts": "done", "sft-data": "done", "sft": "running", "prefs": "pending", "rm": "pending", "dpo": "pending",
                      "eval": "pending"}

    both = cfg.model_copy(update={"out": str(tmp_path / "both"), "prefs": cfg.prefs.model_copy(update={"source": "both"}),
                                  "sft_data": cfg.sft_data.model_copy(update={"keep_unrevised": True})})
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(both.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "both.yaml")])
    assert result.exit_code == 0, result.output
    stages = json.loads((tmp_path / "both" / "stages.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["prompts", "sft-data", "sft", "prefs", "rm", "dpo", "eval"]
    assert all(s["status"] == "done" for s in stages)
    prefs = next(s["summary"] for s in stages if s["name"] == "prefs")
    assert prefs["revision_pairs"] == 0 and prefs["pairs"] == prefs["judge"]["pairs"] > 0
    assert "refusal on harmful prompts" in result.output and "judge: win rate vs SFT" in result.output
    assert (tmp_path / "both" / "report.html").exists()


def _watchdogs_of(argv: list[str]) -> list[list[str]]:
    """Run `python -m cai.cli ARGV` and return the command lines of the watchdogs (cai.reaper) it started."""
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(timeout=120)
    # a watchdog polls every half second and then outlives its job by its grace time, so it is still there
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if cmdline[-3:] == ["-m", "cai.reaper", str(proc.pid)]:
            found.append(cmdline)
    return found


def test_help_and_version_start_no_watchdog_but_a_command_does():
    assert _watchdogs_of(["--version"]) == []
    assert _watchdogs_of(["generate", "sft", "--help"]) == []
    assert len(_watchdogs_of(["constitution", "lint", "constitutions/concise.yaml"])) == 1


@pytest.mark.parametrize("verbose", [False, True])
def test_the_libraries_own_progress_bars_stay_off_the_terminal_unless_verbose(verbose, tiny_model_dir, tmp_path):
    """A training run's terminal is cai's lines: transformers' "Loading weights" bar for each model load and datasets'
    "Saving the dataset" bar say nothing a user can act on (--verbose shows them)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
                            + "\n" for i in range(2)))
    env = {k: v for k, v in os.environ.items() if not k.endswith("DISABLE_PROGRESS_BARS")}
    args = [sys.executable, "-m", "cai", *(["--verbose"] if verbose else []), "train", "sft", "--model", str(tiny_model_dir),
            "--data", str(data), "--out", str(tmp_path / "out"), "--epochs", "1", "--eval-fraction", "0"]
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("Loading weights" in result.stderr) == verbose, result.stderr[-2000:]
