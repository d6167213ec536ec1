"""Experiment trackers: a trainer's per-step metrics sent to TensorBoard, Weights & Biases, MLflow or trackio.

The trackers are accelerate's (`accelerate.tracking`), chosen by the `report_to` setting
(`TrackingSettings`, below). A trainer makes one `Trackers(settings, out)`, calls
`log(record, step)` with each record it writes to OUT/metrics.jsonl, and `finish()` at the end (or uses
it as a context manager, which finishes on an error too). Only the main process of a launch reports.

Where each one writes:
- tensorboard: event files under OUT/tensorboard (`tensorboard --logdir OUT`); the settings as hparams.
- mlflow: `$MLFLOW_TRACKING_URI`, or when unset a local store, the database OUT/mlruns/mlflow.db
  (`mlflow ui --backend-store-uri sqlite:///OUT/mlruns/mlflow.db`; MLflow 3 no longer takes a folder of
  files by default); the experiment is `tracker_project` (`$MLFLOW_EXPERIMENT_NAME` wins, as in accelerate).
- wandb, trackio: as those packages configure themselves (`WANDB_API_KEY`, `WANDB_MODE`, ...), in the
  project `tracker_project`.
Each run of a trainer is one run of the tracker, named after the output folder. A resumed run logs from
the step after its checkpoint: TensorBoard hides the steps the killed run had logged past it
(`purge_step`), the others start a new run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}
"""Each tracker's pip package (accelerate also takes tensorboardX for tensorboard, and the full mlflow)."""

LOCAL_MLFLOW_STORE = ("sqlalchemy", "alembic")
"""What MLflow's local store, a SQLite database, needs beside mlflow-skinny (the full mlflow has them)."""


def missing_packages(report_to: list[str]) -> dict[str, list[str]]:
    """tracker -> the pip packages it needs that this environment lacks, for the trackers of `report_to` (by
    accelerate's own test, which otherwise drops such a tracker without a word)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available,
                 "trackio": is_trackio_available}
    missing = {name: [PACKAGES[name]] for name in report_to if not available[name]()}
    if "mlflow" in report_to and "MLFLOW_TRACKING_URI" not in os.environ:
        lacking = [package for package in LOCAL_MLFLOW_STORE if importlib.util.find_spec(package) is None]
        if lacking:
            missing["mlflow"] = missing.get("mlflow", []) + lacking
    return missing


Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


class TrackingSettings(BaseModel):
    """The experiment trackers a trainer reports its metrics to, besides OUT/metrics.jsonl (every trainer's settings
    take these)."""

    model_config = ConfigDict(extra="forbid")

    report_to: list[Tracker] | None = Field(default=None, description="Experiment trackers for the training metrics: "
                                            "tensorboard (OUT/tensorboard), mlflow ($MLFLOW_TRACKING_URI, else OUT/mlruns/mlflow.db), "
                                            "wandb, trackio (their own environment variables); comma-separated on the "
                                            "command line, or none. Each needs its package; cai's extra `track` has those "
                                            "of tensorboard and mlflow.")
    tracker_project: str = Field(default="cai", min_length=1, description="The trackers' project (W&B, trackio) or "
                                 "experiment (MLflow); each run in it is named after the output folder.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _none_or_names(cls, value: Any) -> Any:
        """"none" (or nothing) is no tracker; one string may name several, comma-separated."""
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",")]
        if isinstance(value, list) and value in ([], ["none"]):
            return None
        return value

    @field_validator("report_to")
    @classmethod
    def _installed(cls, value: list[str] | None) -> list[str] | None:
        """Refuse a tracker whose package is missing now, before any model loads (accelerate would drop it silently)."""
        missing = missing_packages(value or [])
        if missing:
            needs = ", ".join(f"{name} ({', '.join(packages)})" for name, packages in missing.items())
            install = " ".join(package for packages in missing.values() for package in packages)
            raise ValueError(f"the packages of these trackers are not installed here: {needs}; pip install {install}")
        return value


class Trackers:
    """The trackers of one training run: `log(record, step)` per step, `finish()` at the end.

    They start at the first `log`, whose step a resumed run needs (TensorBoard's `purge_step`); the run's
    settings (`settings.model_dump()`, lists comma-joined) go to each as its hyper-parameters.
    """

    def __init__(self, settings: TrackingSettings, out: Path):
        self.settings = settings
        self.out = Path(out)
        self._trackers: list[Any] = []
        self._started = False
        self._set_mlflow_uri = False

    def log(self, record: dict[str, Any], step: int) -> None:
        """Send the record's numbers (not its strings, None or `step` itself) as of optimiser step `step`."""
        if not self._started:
            self._start(step)
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self._trackers:
            tracker.log(mlflow_names(values) if tracker.name == "mlflow" else values, step=step)

    def finish(self, failed: bool = False) -> None:
        """Close every tracker (flush TensorBoard's files, end the MLflow/W&B run); safe to call twice.
        `failed`: the run stopped on an error, which MLflow records (accelerate's `finish` says FINISHED)."""
        for tracker in self._trackers:
            if failed and tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            tracker.finish()
        self._trackers = []
        if self._set_mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(None)  # back to the environment's, for the next run in this process
            self._set_mlflow_uri = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.finish(failed=error is not None)

    def _start(self, step: int) -> None:
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self._started = True
        report_to = self.settings.report_to or []
        if not report_to or not PartialState().is_main_process:
            return
        project, run_name = self.settings.tracker_project, str(self.out)
        for name in report_to:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                # Events of a killed run at steps >= `step` are hidden: the resumed run logs them again.
                tracker = tracker_class("tensorboard", self.out, purge_step=step)
            elif name == "mlflow":
                artifacts = None
                if "MLFLOW_TRACKING_URI" not in os.environ:
                    import mlflow

                    store = self.out / "mlruns"
                    store.mkdir(parents=True, exist_ok=True)
                    mlflow.set_tracking_uri(f"sqlite:///{(store / 'mlflow.db').absolute()}")
                    artifacts = (store / "artifacts").absolute().as_uri()  # else MLflow's ./mlruns, in the working folder
                    self._set_mlflow_uri = True
                tracker = tracker_class(experiment_name=project, logging_dir=artifacts, run_name=run_name)
            else:  # wandb, trackio
                tracker = tracker_class(project, name=run_name)
            tracker.start()
            tracker.store_init_configuration(hyperparameters(self.settings))
            self._trackers.append(tracker)
        logger.info("reporting metrics to %s from step %d", ", ".join(report_to), step)


def hyperparameters(settings: TrackingSettings) -> dict[str, Any]:
    """The settings as one flat mapping of scalars (TensorBoard's hparams take no lists): lists comma-joined,
    nested settings as `parent.field`."""
    flat: dict[str, Any] = {}

    def add(prefix: str, data: dict[str, Any]) -> None:
        for key, value in data.items():
            if isinstance(value, dict):
                add(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = ",".join(map(str, value)) if isinstance(value, list) else value

    add("", settings.model_dump(mode="json"))
    return flat


def mlflow_names(values: dict[str, Any]) -> dict[str, Any]:
    """`values` under names MLflow accepts (letters, digits, `_ - . / : ` and spaces): a reward part such as
    `reward/judge:pairwise?method=bt` is logged as `reward/judge:pairwise_method_bt`."""
    return {re.sub(r"[^\w\-./: ]", "_", k): v for k, v in values.items()}
