"""Small matplotlib figures for the run report (and `cai judge eval`'s page), each returned as a base64 PNG data URI.

Figures are built with `matplotlib.figure.Figure` (the Agg canvas) rather than pyplot, so nothing is
registered in pyplot's global figure list and a report never changes the caller's backend.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cai.train.rl import metrics as M

FIGSIZE = (6.0, 3.0)
DPI = 100


@dataclass(frozen=True)
class Panel:
    """One figure: the metric keys on the left axis, optional ones on a right axis (other scale)."""

    title: str
    keys: tuple[str, ...]
    right: tuple[str, ...] = field(default=())
    ylabel: str = ""


# What every online RL method logs under the same names (`cai.train.rl.metrics`).
_ONLINE = (Panel("reward", (M.SCORES, M.RLHF_REWARD, M.JUDGE_SCORE, M.PROXY_SCORE), ylabel="score"),
           Panel("KL to reference", (M.KL,), right=(M.KL_COEF,), ylabel="KL"),
           Panel("response length", (M.LENGTH_MEAN,), right=(M.EOS_RATE,), ylabel="tokens"))
_CLIPPING = Panel("clipping", (M.CLIPFRAC,), right=(M.APPROXKL,), ylabel="clip fraction")
_GROUP = (*_ONLINE, Panel("losses", (M.LOSS_POLICY, M.LOSS_TOTAL), ylabel="loss"), _CLIPPING)
# Which metrics.jsonl keys each training stage plots; absent keys are skipped.
PANELS: dict[str, tuple[Panel, ...]] = {
    "sft": (Panel("loss", ("loss",), ylabel="loss"),),
    "rm": (Panel("loss", ("loss",), ylabel="loss"),
           Panel("accuracy and margin", ("accuracy",), right=("margin",), ylabel="accuracy")),
    "dpo": (Panel("loss", ("loss",), ylabel="loss"),
            Panel("implicit rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins"), ylabel="reward"),
            Panel("reward accuracy", ("rewards/accuracies", "rewards/accuracy"), ylabel="accuracy")),
    "ppo": (*_ONLINE, Panel("losses", (M.LOSS_POLICY, M.LOSS_VALUE), ylabel="loss"), _CLIPPING),
    "grpo": _GROUP,
    "rloo": _GROUP,
    "online_dpo": (*_ONLINE, Panel("DPO loss", ("loss",), ylabel="loss"),
                   Panel("implicit rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins"), right=("rewards/accuracy",),
                         ylabel="reward")),
}


def is_number(v: Any) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite `key`; a row without a step uses its index."""
    steps, values = [], []
    for i, row in enumerate(rows):
        if is_number(row.get(key)):
            steps.append(row["step"] if is_number(row.get("step")) else i)
            values.append(row[key])
    return steps, values


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    return fig, fig.add_subplot()


def _data_uri(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_keys(ax, rows: Sequence[dict[str, Any]], keys: Sequence[str], styles: Sequence[str]) -> list:
    lines = []
    for key, color in zip(keys, styles):
        steps, values = series(rows, key)
        if steps:
            # Keys logged on only some steps (eval/judge_score) get markers so lone points still show.
            sparse = len(steps) < 20 or 2 * len(steps) < len(rows)
            lines += ax.plot(steps, values, color=color, marker="o" if sparse else None, markersize=3, label=key)
    return lines


def metric_panel(rows: Sequence[dict[str, Any]], panel: Panel) -> str | None:
    """One panel of a training stage against the step, or None when none of its keys were logged."""
    if not any(series(rows, k)[0] for k in (*panel.keys, *panel.right)):
        return None
    fig, ax = _figure()
    colors = [f"C{i}" for i in range(10)]
    lines = _plot_keys(ax, rows, panel.keys, colors)
    if any(series(rows, k)[0] for k in panel.right):
        twin = ax.twinx()
        right = _plot_keys(twin, rows, panel.right, colors[len(panel.keys):])
        for line in right:
            line.set_linestyle("--")
        twin.set_ylabel(" / ".join(line.get_label() for line in right))
        lines += right
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    return _data_uri(fig)


def reward_hacking_plot(points: Sequence[dict[str, Any]]) -> str | None:
    """Proxy (reward model) and gold (judge) scores against KL, in step order (Gao et al. 2022)."""
    rows = [p for p in points if is_number(p.get("kl")) and (is_number(p.get("proxy")) or is_number(p.get("gold")))]
    if not rows:
        return None
    rows.sort(key=lambda p: p["step"] if is_number(p.get("step")) else 0)
    fig, ax = _figure()
    lines = []
    for key, color in (("proxy", "C0"), ("gold", "C3")):
        have = [p for p in rows if is_number(p.get(key))]
        if have:
            lines += ax.plot([p["kl"] for p in have], [p[key] for p in have], color=color, marker="o", markersize=4,
                             label=f"{key} score")
    ax.set_title("proxy vs gold reward")
    ax.set_xlabel("KL(policy || reference)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _data_uri(fig)


def length_bars(lengths: dict[str, Any]) -> str | None:
    """Mean response length, reference against policy."""
    bars = [(label, lengths[key]) for label, key in (("reference (SFT)", "reference_mean"), ("policy", "policy_mean"))
            if is_number(lengths.get(key))]
    if not bars:
        return None
    fig, ax = _figure()
    rects = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["#8a94a6", "#2f6fde"][:len(bars)], width=0.5)
    ax.bar_label(rects, fmt="%.1f", fontsize=8)
    ax.set_title("mean response length")
    ax.set_ylabel("length")
    ax.margins(y=0.15)
    ax.grid(alpha=0.3, axis="y")
    return _data_uri(fig)


def agreement_bars(estimates: dict[str, dict]) -> str | None:
    """The judge's agreement with human labels per constitution, with 95% interval whiskers."""
    bars = [(name, e) for name, e in estimates.items() if e and is_number(e.get("value"))]
    if not bars:
        return None
    fig, ax = _figure()
    values = [e["value"] for _, e in bars]
    # max(0, ...): a Wilson bound at 0 or 1 can sit a rounding error past the value itself
    errors = [[max(0.0, v - (e["low"] if is_number(e.get("low")) else v)) for v, (_, e) in zip(values, bars)],
              [max(0.0, (e["high"] if is_number(e.get("high")) else v) - v) for v, (_, e) in zip(values, bars)]]
    rects = ax.bar([name for name, _ in bars], values, yerr=errors, capsize=4, color="#2f6fde", width=0.5)
    ax.bar_label(rects, fmt="%.2f", fontsize=8, padding=2)
    ax.axhline(0.5, color="#c0392b", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(0, 1)
    ax.set_title("agreement with human labels (95% interval)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    return _data_uri(fig)


def reliability_plot(bins_by_name: dict[str, Sequence[dict]]) -> str | None:
    """Calibration: mean soft label against the human label's mean, per probability bin and constitution."""
    drawn = {name: bins for name, bins in bins_by_name.items() if bins}
    if not drawn:
        return None
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color="#8a94a6", linestyle="--", linewidth=1, label="calibrated")
    for name, bins in drawn.items():
        ax.plot([b["mean_p"] for b in bins], [b["mean_y"] for b in bins], marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("judge's P(A better)")
    ax.set_ylabel("human P(A better)")
    ax.set_title("calibration (reliability)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _data_uri(fig)
