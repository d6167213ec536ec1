"""One self-contained HTML report per pipeline run.

`write_report(run_dir)` reads what the pipeline left in RUN_DIR and writes RUN_DIR/report.html: inline
CSS, plots as base64 PNG data URIs, no JavaScript, so the file opens offline and can be mailed around.
Order: the evaluation headline (the yardstick table: base, SFT and trained model with 95% intervals and
paired changes; monitors; win rates with the judge's own trustworthiness, proxy vs gold reward, lengths, diversity,
sycophancy, before/after samples), the stage table, one section per data and training stage, the config.

Every input is optional: a missing stage folder gets a "not run" line, and an unreadable file or a
partial metrics line (a killed run leaves one) is logged and skipped. All text from the data is escaped
(Jinja2 autoescape): responses are model output.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from cai.files import json_lines, write_text_atomic
from cai.report_plots import PANELS, is_number, length_bars, metric_panel, reward_hacking_plot

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "templates" / "report.html.j2"
DATA_STAGES = ("sft-data", "prefs")
TRAIN_STAGES = ("sft", "rm", "dpo", "ppo")
"""The training stages every report lists, run or not."""
ONLINE_STAGES = ("ppo", "grpo", "rloo", "online_dpo")
"""The online RL stages (`rl.method`): each writes metrics.jsonl with the shared metric names, and samples.jsonl. Those
not in TRAIN_STAGES are listed when their folder or their stages.json row exists."""
TITLES = {"sft-data": "SFT data (critique and revision)", "prefs": "Preference data (AI feedback)",
          "sft": "Supervised fine-tuning", "rm": "Reward model", "dpo": "DPO", "ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO",
          "online_dpo": "Online DPO (AI feedback)"}
STATUSES = ("done", "running", "pending", "skipped")
N_PPO_SAMPLES = 6
N_EVAL_SAMPLES = 8  # before/after pairs shown; the rest stay in eval.json


@dataclass
class StageSection:
    """What the template shows for one stage folder."""

    folder: str
    title: str
    status: str | None  # from stages.json; None when it does not list the stage
    ran: bool  # the folder exists
    summary: list[tuple[str, str]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    steps: int = 0  # metrics rows read
    samples: list[dict[str, str]] = field(default_factory=list)


# -- reading -------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("report: skipping unreadable %s: %s", path, e)
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of a file; partial or corrupt lines are skipped (a killed run leaves one)."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        logger.warning("report: skipping unreadable %s: %s", path, e)
        return []
    rows, bad = [], 0
    for _, row, _ in json_lines(text.splitlines()):
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        logger.warning("report: skipped %d unreadable line(s) in %s", bad, path)
    return rows


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _dicts(v: Any) -> list[dict[str, Any]]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


# -- formatting ----------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    """A value for a table cell: floats to 4 significant digits, short lists inline."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, list):
        if len(v) <= 8 and not any(isinstance(x, dict | list) for x in v):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"[{len(v)} items]"
    if isinstance(v, dict):
        return "{}"
    return str(v)


def pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if is_number(v) else "—"


def text(v: Any) -> str:
    """Free text from the data (a prompt, a response); non-strings shown as JSON."""
    return v if isinstance(v, str) else "" if v is None else json.dumps(v, ensure_ascii=False)


def duration(seconds: Any) -> str:
    if not is_number(seconds):
        return "—"
    s = int(round(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{s // 60}m {s % 60:02d}s" if s < 3600 else f"{s // 3600}h {s % 3600 // 60:02d}m"


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Key/value rows of a nested dict, nested keys joined with dots, values formatted."""
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", fmt(v)))
    return out


# -- sections ------------------------------------------------------------------------------------
def _stage_rows(doc: Any) -> list[dict[str, str]]:
    rows = []
    for s in _dicts(_dict(doc).get("stages")):
        status = str(s.get("status") or "unknown")
        rows.append({"name": text(s.get("name")) or "?", "status": status,
                     "css": status if status in STATUSES else "unknown",
                     "seconds": duration(s.get("seconds")), "folder": text(s.get("folder"))})
    return rows


def _stage_section(run_dir: Path, folder: str, status: str | None) -> StageSection:
    path = run_dir / folder
    section = StageSection(folder, TITLES[folder], status, path.is_dir())
    if not section.ran:
        return section
    section.summary = flatten(_dict(_read_json(path / "summary.json")))
    if folder in PANELS:
        rows = _read_jsonl(path / "metrics.jsonl")
        section.steps = len(rows)
        section.plots = [uri for panel in PANELS[folder] if (uri := metric_panel(rows, panel))]
    if folder in ONLINE_STAGES:
        section.samples = [{"step": fmt(r.get("step")), "prompt": text(r.get("prompt")), "response": text(r.get("response")),
                            "score": fmt(r.get("score")), "kl": fmt(r.get("kl"))}
                           for r in _read_jsonl(path / "samples.jsonl")[-N_PPO_SAMPLES:]]
    return section


def _monitor(m: dict[str, Any]) -> dict[str, Any]:
    figures = _dict(m.get("figures"))
    if figures.get("insufficient"):
        badge, label = "insufficient", "not enough data"
    elif m.get("flagged"):
        badge, label = "flagged", "flagged"
    else:
        badge, label = "ok", "ok"
    return {"name": text(m.get("name")) or "monitor", "badge": badge, "label": label, "message": text(m.get("message")),
            "figures": [(k, v) for k, v in flatten(figures) if k != "insufficient"]}


MODEL_LABELS = {"base": "base model", "reference": "SFT (reference)", "policy": "trained (policy)"}
PERCENT_ROWS = ("refusal_harmful", "refusal_benign", "toxicity_share")


def _estimate(e: Any, percent: bool, signed: bool = False) -> str:
    """'12.5% [4.1, 30.2]' or '48.2 [41.0, 55.1]': a value and its 95% interval."""
    e = _dict(e)
    v, lo, hi = e.get("value"), e.get("low"), e.get("high")
    if not is_number(v):
        return "—"
    scale, unit = (100, "%") if percent else (1, "")
    num = (lambda x: f"{scale * x:+.3g}") if signed else (lambda x: f"{scale * x:.3g}")
    interval = f" [{num(lo)}, {num(hi)}]" if is_number(lo) and is_number(hi) else ""
    return f"{num(v)}{unit}{interval}"


def _yardstick_view(table: Any) -> dict[str, Any] | None:
    """The first screen: each yardstick for each model, and each change with its paired interval and verdict."""
    table = _dict(table)
    models = [m for m in table.get("models") or [] if isinstance(m, str)]
    if not models:
        return None
    rows, moved, changes = [], [], []
    for r in _dicts(table.get("rows")):
        percent = r.get("name") in PERCENT_ROWS
        cells = [_estimate(_dict(r.get("values")).get(m), percent) for m in models]
        deltas = []
        for c in _dicts(r.get("changes")):
            label = f"{c.get('from')} → {c.get('to')}"
            if label not in changes:
                changes.append(label)
            verdict = text(c.get("verdict"))
            deltas.append({"text": _estimate(c, percent, signed=True), "verdict": verdict,
                           "css": {"better": "ok", "worse": "flagged"}.get(verdict, "moved" if c.get("moved") else "")})
            if c.get("moved"):
                moved.append(f"{r.get('label')}: {label} {verdict} ({_estimate(c, percent, signed=True)})")
        subset = text(r.get("subset"))
        rows.append({"label": text(r.get("label")), "subset": f"{subset}, n={fmt(r.get('n'))}", "cells": cells, "deltas": deltas})
    return {"models": [MODEL_LABELS.get(m, m) for m in models], "changes": changes, "rows": rows, "moved": moved,
            "interval": text(table.get("interval")), "n_harmful": fmt(table.get("n_harmful")), "n_benign": fmt(table.get("n_benign")),
            "comparisons": table.get("comparisons") if is_number(table.get("comparisons")) else None}


def _eval_view(doc: dict[str, Any]) -> dict[str, Any]:
    """Everything the headline shows, formatted; absent parts come out empty."""
    ci = doc.get("win_rate_ci")
    ci_note = f"CI {pct(ci[0])} – {pct(ci[1])}" if isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci)) else ""
    same = _dict(doc.get("position_bias")).get("same_position_rate")
    trust = _dict(doc.get("judge_trust"))
    tiles = [(k, v, note) for k, v, note in (
        ("win rate vs reference", pct(doc.get("win_rate")), ci_note),
        ("length-controlled win rate", pct(doc.get("lc_win_rate")), ""),
        ("prompts judged", fmt(doc.get("n_prompts")) if is_number(doc.get("n_prompts")) else "—", ""),
        ("judge same-position rate", pct(same), "picks the same slot in both orders"),
        ("judge option mass", _estimate(trust.get("option_mass"), percent=True), "probability on the A/B tokens at all"),
        ("judge agreement with humans", _estimate(trust.get("human_agreement"), percent=True),
         f"on {fmt(_dict(trust.get('human_agreement')).get('n'))} labelled pairs"),
    ) if v != "—"]

    diversity = _dict(doc.get("diversity"))
    ref, pol = _dict(diversity.get("reference")), _dict(diversity.get("policy"))
    div_rows = [(k, fmt(ref.get(k)), fmt(pol.get(k))) for k in dict.fromkeys([*ref, *pol])]

    syc = _dict(doc.get("sycophancy"))
    labels = {"reference_rate": "reference (SFT)", "policy_rate": "policy", "undecided_share": "undecided share"}
    syc_rows = [(labels.get(k, k), pct(v) if is_number(v) else fmt(v)) for k, v in syc.items()]

    samples = [{"prompt": text(s.get("prompt")), "kind": text(s.get("kind")), "base": text(s.get("base")),
                "reference": text(s.get("reference")), "policy": text(s.get("policy")),
                "p": fmt(s.get("p_policy")) if is_number(s.get("p_policy")) else "",
                "winner": ("policy" if s["p_policy"] > 0.5 else "reference" if s["p_policy"] < 0.5 else "tie")
                if is_number(s.get("p_policy")) else ""}
               for s in _dicts(doc.get("samples"))]
    plots = [(uri, alt) for uri, alt in (
        (reward_hacking_plot(_dicts(doc.get("reward_hacking"))), "proxy and gold reward against KL"),
        (length_bars(_dict(doc.get("lengths"))), "mean response length, reference and policy"),
    ) if uri]
    return {"yardsticks": _yardstick_view(doc.get("yardsticks")),
            "monitors": [_monitor(m) for m in _dicts(doc.get("monitors"))], "tiles": tiles, "plots": plots,
            "diversity": div_rows, "sycophancy": syc_rows, "samples": samples[:N_EVAL_SAMPLES], "n_samples": len(samples)}


# -- entry point ---------------------------------------------------------------------------------
def render_report(run_dir: Path) -> str:
    """The report of RUN_DIR as one HTML string."""
    run_dir = Path(run_dir)
    stages = _stage_rows(_read_json(run_dir / "stages.json"))
    status = {**{r["name"]: r["status"] for r in stages}, **{r["folder"]: r["status"] for r in stages if r["folder"]}}
    eval_doc = _read_json(run_dir / "eval" / "eval.json")
    config = None
    if (run_dir / "run_config.yaml").is_file():
        try:
            config = (run_dir / "run_config.yaml").read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            logger.warning("report: skipping unreadable %s: %s", run_dir / "run_config.yaml", e)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE.name).render(
        title=run_dir.resolve().name, run_dir=str(run_dir.resolve()), generated=datetime.now().isoformat(timespec="seconds"),
        ev=_eval_view(eval_doc) if isinstance(eval_doc, dict) else None,
        eval_ran=(run_dir / "eval").is_dir(), eval_status=status.get("eval"),
        stages=stages, config=config,
        data=[_stage_section(run_dir, f, status.get(f)) for f in DATA_STAGES],
        train=[_stage_section(run_dir, f, status.get(f)) for f in TRAIN_STAGES + tuple(
            f for f in ONLINE_STAGES if f not in TRAIN_STAGES and ((run_dir / f).is_dir() or f in status))])


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html (self-contained: inline CSS, embedded PNGs) and return its path."""
    run_dir = Path(run_dir)
    out = run_dir / "report.html"
    write_text_atomic(out, render_report(run_dir))  # so a browser never sees half a report
    logger.info("report written to %s", out)
    return out
