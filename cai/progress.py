"""The one progress bar of every long job (generation, training, PPO, evaluation): count, share,
rate, elapsed time, ETA, and a short status text (`info=` on add_task/update, e.g. the loss)."""

from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Items per minute (the bar's own speed estimate)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed * 60:.1f} {self.unit}/min" if task.speed else f"- {self.unit}/min")


class _InfoColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress_bar(unit: str = "items", *, disable: bool = False) -> Progress:
    """A rich Progress with rate in `unit`s per minute and ETA; `disable` for processes other than the main one."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), _RateColumn(unit),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), _InfoColumn(), disable=disable)
