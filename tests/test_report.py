"""The HTML run report: sections, escaping, embedded PNGs, and runs that are partial or broken."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

import pytest

from cai.report import flatten, write_report

XSS = "<script>alert(1)</script>"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def _ppo_row(step: int) -> dict:
    row = {"step": step, "objective/kl": 0.02 * step, "objective/kl_coef": 0.05, "objective/scores": 0.1 + 0.03 * step,
           "objective/rlhf_reward": 0.1 + 0.02 * step, "objective/entropy": 2.1, "objective/non_score_reward": -0.001 * step,
           "ppo/policy/clipfrac": 0.1, "ppo/policy/approxkl": 0.004, "ppo/loss/policy": -0.01, "ppo/loss/value": 0.3 / step,
           "ppo/val/vpred": 0.2, "response/length_mean": 40 + step, "response/eos_rate": 0.9}
    if step % 5 == 0:  # the judge scores only some iterations
        row["eval/judge_score"] = 0.4 + 0.01 * step
    return row


def build_run(root: Path, *, stages: tuple[str, ...] = ("sft-data", "prefs", "sft", "rm", "ppo", "eval")) -> Path:
    """A run directory as the pipeline writes it, with small realistic numbers."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "run_config.yaml").write_text("model: smollm2-135m-instruct\nconstitution: harmless-helpful\nppo:\n  iterations: 20\n",
                                      encoding="utf-8")
    order = ["sft-data", "prefs", "sft", "rm", "dpo", "ppo", "eval"]
    _json(root / "stages.json", {"stages": [
        {"name": s, "status": "done" if s in stages else "skipped", "seconds": 12.5 * (i + 1) if s in stages else None,
         "folder": s} for i, s in enumerate(order)]})
    if "sft-data" in stages:
        _json(root / "sft-data" / "summary.json", {"rows": 24, "failed": 0, "mean_chars_revised": 210.25,
                                                    "revisions": {"changed_rate": 0.7916667}})
    if "prefs" in stages:
        _json(root / "prefs" / "summary.json", {"rows": 24, "failed": 1, "label_entropy_bits": 0.918296,
                                                 "position_consistency_rate": 0.3333, "mean_chars_chosen": 200.5,
                                                 "longer_is_chosen_rate": 0.625})
    if "sft" in stages:
        _jsonl(root / "sft" / "metrics.jsonl", [{"step": s, "loss": 2.5 - 0.05 * s, "grad_norm": 1.2, "lr": 1e-4}
                                                for s in range(1, 31)])
        _json(root / "sft" / "summary.json", {"steps": 30})
    if "rm" in stages:
        _jsonl(root / "rm" / "metrics.jsonl", [{"step": s, "loss": 0.69 - 0.004 * s, "accuracy": 0.5 + 0.005 * s,
                                                "margin": 0.01 * s} for s in range(1, 41)])
        _json(root / "rm" / "summary.json", {"steps": 40, "eval": {"accuracy": 0.6133, "mean_margin": 0.3012, "ece": 0.0311,
                                                                   "brier": 0.2398, "eval_pairs": 300}})
    if "dpo" in stages:
        _jsonl(root / "dpo" / "metrics.jsonl", [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/chosen": 0.01 * s,
                                                 "rewards/rejected": -0.01 * s, "rewards/margins": 0.02 * s,
                                                 "rewards/accuracies": 0.6} for s in range(1, 21)])
        _json(root / "dpo" / "summary.json", {"steps": 20})
    if "ppo" in stages:
        _jsonl(root / "ppo" / "metrics.jsonl", [_ppo_row(s) for s in range(1, 21)])
        _json(root / "ppo" / "summary.json", {"iterations": 20, "last": {"objective/kl": 0.4, "objective/scores": 0.7}})
        _jsonl(root / "ppo" / "samples.jsonl", [
            {"step": s, "prompt": f"How do I bake bread? ({s})", "response": XSS if s == 20 else "Mix flour, water and yeast.",
             "score": 0.5, "kl": 0.1} for s in range(1, 21)])
    if "eval" in stages:
        from cai.yardsticks import yardstick_table

        kinds = ["harmful"] * 8 + ["benign"] * 8
        base = [("Sure, step one, step two.", 20)] * 16
        refusing = [("I'm sorry, I can't help with that.", 9)] * 16  # refuses everything: harmless-looking, not helpful
        _json(root / "eval" / "eval.json", {
            "yardsticks": yardstick_table({"base": base, "reference": base, "policy": refusing}, kinds),
            "judge_trust": {"same_position": {"value": 0.4, "low": 0.2, "high": 0.6, "n": 16},
                            "option_mass": {"value": 0.91, "low": 0.88, "high": 0.94, "n": 16},
                            "human_agreement": {"value": 0.5, "low": 0.3, "high": 0.7, "n": 20}},
            "n_prompts": 16, "win_rate": 0.5625, "win_rate_ci": [0.41, 0.70], "lc_win_rate": 0.52,
            "lengths": {"reference_mean": 40.1, "policy_mean": 52.3},
            "diversity": {"reference": {"distinct_1": 0.41, "distinct_2": 0.78, "self_similarity": 0.22},
                          "policy": {"distinct_1": 0.37, "distinct_2": 0.71, "self_similarity": 0.29}},
            "sycophancy": {"reference_rate": 0.2, "policy_rate": 0.3, "undecided_share": 0.5},
            "position_bias": {"same_position_rate": 0.4},
            "reward_hacking": [{"step": s, "kl": 0.02 * s, "proxy": 0.1 + 0.03 * s, "gold": 0.4 + 0.01 * s - 0.0008 * s * s}
                               for s in range(0, 21, 5)],
            "monitors": [
                {"name": "verbosity", "flagged": True, "message": "policy responses are 30% longer than the reference",
                 "figures": {"length_ratio": 1.304}},
                {"name": "reward hacking", "flagged": False, "message": "gold score tracks the proxy",
                 "figures": {"spearman": 0.9}},
                {"name": "sycophancy", "flagged": False, "message": "too few decided pairs",
                 "figures": {"insufficient": True, "decided": 3}},
            ],
            "samples": [{"prompt": "Tell me a joke.", "reference": "Why did the chicken cross the road?",
                         "policy": XSS, "p_policy": 0.7},
                        {"prompt": "Explain KL divergence.", "reference": "It measures how one distribution differs.",
                         "policy": "KL(p||q) = sum p log(p/q).", "p_policy": 0.35}],
        })
    return root


def _section(html: str, anchor: str) -> str:
    """The HTML of one top-level <section id=...>."""
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert m, anchor
    return m.group(1)


@pytest.fixture(scope="module")
def full_html(tmp_path_factory) -> str:
    """One rendered report of a full run, shared: plotting is the slow part."""
    run = build_run(tmp_path_factory.mktemp("report") / "run")
    out = write_report(run)
    assert out == run / "report.html" and not list(run.glob("report.html*.tmp"))
    return out.read_text(encoding="utf-8")


def test_full_run_has_every_section(full_html):
    html = full_html
    assert html.index('id="eval"') < html.index('id="stages"')  # the headline comes first
    for text in ("Monitors", "Win rate against the reference", "56.2%", "CI 41.0% – 70.0%", "52.0%", "Diversity",
                 "distinct_2", "Sycophancy", "Before and after", "Tell me a joke.",
                 "SFT data (critique and revision)", "revisions.changed_rate", "0.7917", "label_entropy_bits", "0.9183",
                 "Supervised fine-tuning", "Reward model", "eval.accuracy", "0.6133", "eval.ece",
                 "Latest samples", "model: smollm2-135m-instruct"):
        assert text in html, text
    assert "DPO</strong> (dpo/): not run (skipped)." in _section(html, "training")
    # Only the last N_PPO_SAMPLES sample rows are shown.
    assert "(20)" in html and "(15)" in html and "(14)" not in html


def test_the_first_screen_is_the_yardstick_table_with_intervals_and_verdicts(full_html):
    ev = _section(full_html, "eval")
    assert ev.index("What each stage did, measured without the judge") < ev.index("Monitors") < ev.index("Win rate against")
    table = ev.split('<table class="yardsticks">', 1)[1].split("</table>", 1)[0]
    rows = {html.unescape(re.sub(r"<[^>]+>", "", r.split("</td>", 1)[0])): r for r in table.split("<tr>")[2:]}
    assert list(rows) == ["refusal on harmful prompts", "over-refusal on benign prompts", "toxicity (mean classifier score)",
                          "toxic answers (score > 0.5)", "answer length (tokens)", "distinct-2 within an answer (1 = no repeats)"]
    for head in ("base model", "SFT (reference)", "trained (policy)", "base → reference", "reference → policy", "base → policy"):
        assert f"<th>{head}</th>" in table, head
    assert "100% [67.6, 100]" in rows["over-refusal on benign prompts"]  # the Wilson interval of 8 of 8
    assert '<span class="badge flagged">worse</span>' in rows["over-refusal on benign prompts"]
    assert '<span class="badge ok">better</span>' in rows["refusal on harmful prompts"]
    assert "no change" in rows["refusal on harmful prompts"]  # base -> reference: the same answers
    assert "Beyond the 95% interval: <strong>refusal on harmful prompts: reference → policy better" in ev
    assert "judge agreement with humans" in ev and "50% [30, 70]" in ev and "on 20 labelled pairs" in ev


def test_monitor_badges(full_html):
    html = full_html
    cards = re.findall(r'<div class="monitor (\w+)">\s*<div><strong>([^<]+)</strong>', html)
    assert cards == [("flagged", "verbosity"), ("ok", "reward hacking"), ("insufficient", "sycophancy")]
    assert '<span class="badge flagged">flagged</span>' in html
    assert "policy responses are 30% longer than the reference" in html
    assert "not enough data" in html


def test_model_output_is_escaped(full_html):
    html = full_html
    assert XSS not in html and "<script" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # the PPO sample and the eval sample


def test_plots_are_embedded_pngs(tmp_path):
    html = write_report(build_run(tmp_path / "run", stages=("sft", "rm", "dpo", "ppo", "eval"))).read_text(encoding="utf-8")
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # sft 1, rm 2, dpo 3, ppo 5, eval 2 (proxy vs gold, lengths)
    assert len(uris) == 13
    assert all(base64.b64decode(u).startswith(b"\x89PNG\r\n\x1a\n") for u in uris)
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_missing_stages_say_not_run(tmp_path):
    html = write_report(build_run(tmp_path / "run", stages=("sft",))).read_text(encoding="utf-8")
    assert "Evaluation not run (skipped)." in html
    for title in ("SFT data (critique and revision)", "Preference data (AI feedback)", "Reward model", "DPO", "PPO"):
        assert re.search(rf"<strong>{re.escape(title)}</strong> \([\w-]+/\): not run", html), title
    assert '<div class="stage" id="stage-sft">' in html


def test_truncated_metrics_line_is_skipped(tmp_path, caplog):
    run = build_run(tmp_path / "run", stages=("rm", "ppo"))
    with open(run / "rm" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 41, "loss": 0.5, "accur')  # a run killed mid-write
    with open(run / "ppo" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('[1, 2]\n{"step": 21, "objective/kl": NaN, "objective/scores": "n/a"}\n')
    (run / "ppo" / "summary.json").write_text('{"iterations": 2', encoding="utf-8")
    html = write_report(run).read_text(encoding="utf-8")
    assert "40 logged steps" in html and "21 logged steps" in html  # the NaN row stays, its values do not plot
    assert "skipped 1 unreadable line(s)" in caplog.text and "skipping unreadable" in caplog.text


def test_empty_run_dir_renders(tmp_path):
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Evaluation not run" in html and "No stages.json" in html and "No run_config.yaml" in html
    assert html.count(": not run") == 6


def test_stage_folder_without_files(tmp_path):
    (tmp_path / "sft").mkdir()
    _json(tmp_path / "eval" / "eval.json", {"n_prompts": 4, "samples": [], "monitors": [], "reward_hacking": []})
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Nothing written yet." in html
    assert "prompts judged" in html and "data:image/png" not in html


@pytest.mark.parametrize("doc", [[1, 2], "text", {"monitors": "x", "win_rate_ci": [0.1], "lengths": [], "samples": [3]}])
def test_malformed_eval_json(tmp_path, doc):
    _json(tmp_path / "eval" / "eval.json", doc)
    _json(tmp_path / "stages.json", {"stages": [{"name": "eval", "status": "weird\"><b>", "seconds": "x"}, 7]})
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<b>" not in html
    assert ("No readable eval/eval.json" in html) == (not isinstance(doc, dict))


def test_corrupt_eval_json(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text('{"win_rate": 0.5', encoding="utf-8")
    assert "No readable eval/eval.json." in write_report(tmp_path).read_text(encoding="utf-8")


def test_flatten_formats_numbers():
    rows = dict(flatten({"a": 0.123456, "b": {"c": 1, "d": {"e": math.inf}}, "f": [0.5, 2], "g": None, "h": True}))
    assert rows == {"a": "0.1235", "b.c": "1", "b.d.e": "inf", "f": "[0.5, 2]", "g": "—", "h": "yes"}
