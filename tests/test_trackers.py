"""Experiment trackers (`report_to`): TensorBoard's event files and a local MLflow store hold what metrics.jsonl holds,
at the true optimiser steps, also across a resume; a missing package is refused before any model loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.pinning import RunMismatchError
from cai.train.checkpoint import STATE_FILE
from cai.train.loop import train
from cai.train.run import run_training
from cai.train.settings import TrainJob, pin_trainer_settings
from cai.train.tasks import build_task

SFT = [{"messages": [{"role": "user", "content": f"Say hello {i}"}, {"role": "assistant", "content": f"Hello {i}!"}]} for i in range(12)]


@pytest.fixture(autouse=True)
def local_mlflow(monkeypatch):
    """No tracking server or experiment of the machine's: MLflow falls back to OUT/mlruns."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def sft_job(tmp_path: Path, tiny_model_dir: Path, out: str, **kw) -> TrainJob:
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    return TrainJob(kind="sft", model=str(tiny_model_dir), data=str(data), out=str(tmp_path / out), batch_size=4, max_length=64,
                    eval_fraction=0.0, lr=5e-3, checkpoint_every=2, **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> (step, value) as TensorBoard shows them (a restarted writer's purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_hparams(out: Path) -> dict[str, object]:
    """The hyper-parameters of the run (torch's `add_hparams` writes them to an event file in a subfolder of its own)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    (folder,) = {p.parent for p in (out / "tensorboard").glob("*/events.out.tfevents.*")}
    events = EventAccumulator(str(folder))
    events.Reload()
    data = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}


def mlflow_runs(out: Path) -> list:
    """The runs of the experiment "cai" in the local store OUT/mlruns/mlflow.db, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlruns' / 'mlflow.db').absolute()}")
    experiment = client.get_experiment_by_name("cai")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [(run, client) for run in runs]


def mlflow_history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_tensorboard_and_mlflow_get_every_step_of_metrics_jsonl(tmp_path, tiny_model_dir):
    import os

    job = sft_job(tmp_path, tiny_model_dir, "out", max_steps=3, report_to="tensorboard,mlflow")
    run_training(job)
    out = Path(job.out)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    numbers = {k for k, v in rows[0].items() if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "grad_norm", "tokens", "lr"} <= numbers

    scalars = tensorboard_scalars(out)
    assert set(scalars) == numbers
    for key in numbers:
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]  # TensorBoard keeps float32
    hparams = tensorboard_hparams(out)
    assert hparams["lr"] == pytest.approx(5e-3) and hparams["kind"] == "sft" and hparams["report_to"] == "tensorboard,mlflow"

    ((run, client),) = mlflow_runs(out)
    assert run.info.run_name == str(out) and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.005" and run.data.params["max_steps"] == "3" and run.data.params["lora_r"] == "8"
    assert set(run.data.metrics) == numbers
    for key in numbers:
        assert mlflow_history(client, run, key) == [(r["step"], pytest.approx(r[key])) for r in rows]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the local store was this run's only


def test_a_resumed_run_logs_each_step_once_at_its_true_step(tmp_path, tiny_model_dir):
    import os

    job = sft_job(tmp_path, tiny_model_dir, "crashy", epochs=4, grad_accum=2, report_to=["tensorboard", "mlflow"])
    out = Path(job.out)
    task = build_task(job, out)
    calls = {"n": 0}
    real_loss = task.loss

    def failing_loss(model, items, counts):
        calls["n"] += 1
        if calls["n"] == 11:  # inside step 6: step 5 was logged, the checkpoint is step 4's
            raise RuntimeError("simulated crash")
        return real_loss(model, items, counts)

    task.loss = failing_loss
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(job, task, out)
    assert [step for step, _ in tensorboard_scalars(out)["loss"]] == [1, 2, 3, 4, 5]
    ((crashed, client),) = mlflow_runs(out)
    assert crashed.info.status == "FAILED" and [s for s, _ in mlflow_history(client, crashed, "loss")] == [1, 2, 3, 4, 5]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # finished on the error too

    run_training(job)  # resumes from step 4 and logs steps 5 and 6 again
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(out)["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    (_, (resumed, client)) = mlflow_runs(out)  # a new MLflow run, from the step after the checkpoint
    assert resumed.info.status == "FINISHED"
    assert mlflow_history(client, resumed, "loss") == [(r["step"], pytest.approx(r["loss"])) for r in rows[4:]]


def test_a_resume_may_change_the_trackers_but_not_the_training(tmp_path):
    job = TrainJob(kind="sft", model="m", data="d", out=str(tmp_path / "out"))
    pin_trainer_settings(job, tmp_path / "out")
    (tmp_path / "out" / "checkpoint").mkdir()
    (tmp_path / "out" / "checkpoint" / STATE_FILE).write_bytes(b"")
    pin_trainer_settings(job.model_copy(update={"report_to": ["tensorboard"], "tracker_project": "other"}), tmp_path / "out")
    with pytest.raises(RunMismatchError, match="lr: was 0.0001, now 0.001"):
        pin_trainer_settings(job.model_copy(update={"lr": 1e-3}), tmp_path / "out")


def test_report_to_none_writes_no_tracker_files(tmp_path, tiny_model_dir):
    job = sft_job(tmp_path, tiny_model_dir, "plain", max_steps=1, report_to="none")
    assert job.report_to is None and TrainJob.model_fields["report_to"].default is None
    run_training(job)
    out = Path(job.out)
    assert len(metrics(out)) == 1
    assert not (out / "tensorboard").exists() and not (out / "mlruns").exists()


def test_the_flag_is_in_help_and_takes_a_comma_separated_list(tmp_path):
    # the help's text with its table's borders dropped: a description wraps inside the box at any width
    shown = " ".join(CliRunner().invoke(app, ["train", "sft", "--help"], terminal_width=200).output.replace("│", " ").split())
    assert "--report-to" in shown and "(default: none)" in shown
    assert "--tracker-project" in shown
    config = tmp_path / "sft.yaml"
    config.write_text("kind: sft\nmodel: m\ndata: d\nout: o\nreport_to: tensorbord\n")
    result = CliRunner().invoke(app, ["train", "sft", "--config", str(config)])
    assert result.exit_code == 1 and "report_to.0: Input should be 'tensorboard', 'wandb', 'mlflow' or 'trackio'" in result.output


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="needs an environment without wandb")
def test_a_missing_tracker_package_is_named_before_any_model_loads(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "sft", "--model", "no-such-model", "--data", str(data), "--out", str(out),
                                      "--report-to", "tensorboard,wandb"])
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert ("flags: report_to: Value error, the packages of these trackers are not installed here: wandb (wandb); "
            "pip install wandb") in line
    assert not out.exists()  # refused while reading the flags: no model named "no-such-model" was looked for


def test_an_rl_run_reports_every_iteration_with_its_reward_parts(tmp_path, tiny_model_dir):
    """GRPO (the shared RL trainer) sends each metrics.jsonl record to the trackers at its iteration; MLflow gets the
    reward part `reward/rule:share=e` under a name it accepts."""
    from cai.train.rl.grpo import run_grpo
    from cai.train.rl.settings import GRPOJob

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a word with e, number {i}"}) + "\n" for i in range(4)))
    job = GRPOJob(model=str(tiny_model_dir), reward="rule:share=e", prompts=str(prompts), out=str(tmp_path / "grpo"), batch_size=4,
                  num_generations=2, mini_batches=1, iterations=2, response_length=4, report_to="tensorboard,mlflow",
                  lora_target_modules=["q_proj"], seed=1)
    run_grpo(job)
    out = Path(job.out)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    numbers = {k for k, v in rows[0].items() if k != "step" and isinstance(v, (int, float))}
    assert "reward/rule:share=e" in numbers and "objective/kl" in numbers
    scalars = tensorboard_scalars(out)
    assert set(scalars) == numbers
    assert scalars["objective/scores"] == [(r["step"], pytest.approx(r["objective/scores"], abs=1e-6)) for r in rows]  # jsonl rounds to 6 places
    ((run, client),) = mlflow_runs(out)
    assert "reward/rule:share_e" in run.data.metrics and "reward/rule:share=e" not in run.data.metrics
    assert mlflow_history(client, run, "reward/rule:share_e") == [(r["step"], pytest.approx(r["reward/rule:share=e"], abs=1e-6)) for r in rows]
    assert run.data.params["num_generations"] == "2"
