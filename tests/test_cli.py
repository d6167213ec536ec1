"""The command line: --help everywhere, and the demo end to end on the tiny model."""

from __future__ import annotations

import json

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


@pytest.mark.slow
def test_demo_runs_on_the_tiny_model(tiny_model_dir, judge, tmp_path, monkeypatch):
    # Against the session's judge server (the same tiny model) to save a second engine start.
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    result = CliRunner().invoke(app, ["demo", "--model", str(tiny_model_dir), "--n", "2", "--prompts", "mtbench",
                                      "--out", str(tmp_path), "--judge-url", judge.url])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "demo.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["id"].startswith("mtbench:") and row["prompt"]
        assert 0.0 <= row["p_revision_better"] <= 1.0
        assert row["p_revision_better"] == pytest.approx((row["p_shown_first"] + row["p_shown_second"]) / 2, abs=1e-6)
        assert len(row["constitution_hash"]) == 64 and row["judge_model"] == str(tiny_model_dir)
    assert "mean P(revision better)" in result.output
