"""`cai judge eval`: the trust figures (hand-checked), the human-label file, and a run against the real judge."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.human_labels import human_pairs
from cai.judge_eval import JudgeEvalError, JudgeEvalJob, ece, entropy_bits, figures, placements, run_judge_eval
from cai.report_plots import agreement_bars
from cai.train.data import DatasetError
from tests.conftest import JUDGE_KEY


def test_entropy_and_ece_by_hand():
    assert entropy_bits(0.5) == pytest.approx(1.0)
    assert entropy_bits(0.0) == entropy_bits(1.0) == 0.0
    assert entropy_bits(0.9) == pytest.approx(-(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1)))
    # Two bins: [0.1, 0.15] with targets [0, 1] (|0.125 - 0.5| = 0.375) and [0.95] with target 1 (0.05).
    p, y = np.array([0.1, 0.15, 0.95]), np.array([0.0, 1.0, 1.0])
    assert ece(p, y) == pytest.approx(2 / 3 * 0.375 + 1 / 3 * 0.05)
    assert ece(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.0  # p = 1.0 falls in the last bin, not past it


def test_figures_from_judgements():
    rows = [
        {"p_a": 0.8, "y_a": 1.0, "agree": True, "same_position": False, "option_mass": 0.9, "by_principle": {"a": True}},
        {"p_a": 0.6, "y_a": 0.0, "agree": False, "same_position": True, "option_mass": 0.7, "by_principle": {"b": False}},
        {"p_a": 0.3, "y_a": 0.0, "agree": True, "same_position": False, "option_mass": 0.8, "by_principle": {"a": True}},
        {"p_a": 0.5, "y_a": 1.0, "agree": False, "same_position": True, "option_mass": 0.6, "by_principle": {"b": False}},
    ]
    f = figures(rows, seed=0)
    assert f["n_pairs"] == 4
    assert f["agreement"]["value"] == 0.5 and f["agreement"]["low"] < 0.5 < f["agreement"]["high"]
    assert f["position_consistency"]["value"] == 0.5
    assert f["option_mass"]["value"] == pytest.approx(0.75)
    assert f["brier"]["value"] == pytest.approx((0.04 + 0.36 + 0.09 + 0.25) / 4)
    assert f["brier"]["low"] <= f["brier"]["value"] <= f["brier"]["high"]
    assert f["label_entropy_bits"]["value"] == pytest.approx(np.mean([entropy_bits(p) for p in (0.8, 0.6, 0.3, 0.5)]))
    assert f["per_principle"]["a"]["value"] == 1.0 and f["per_principle"]["b"]["value"] == 0.0
    assert sum(b["n"] for b in f["reliability"]) == 4
    # A Wilson bound a rounding error past the value (seen at 1.0) still plots.
    assert agreement_bars({"x": {"value": 1.0, "low": 0.6, "high": 0.9999999999999999}}).startswith("data:image/png;base64,")


def test_the_human_choice_is_put_in_either_slot_by_a_seeded_coin():
    pairs = [{}] * 200
    slots = placements(pairs, seed=0)
    assert slots == placements(pairs, seed=0)
    assert 70 < sum(slots) < 130  # about half in slot A, so "always A" is no better than chance


def test_a_soft_human_label_is_read_and_a_bad_one_named(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0.75}) + "\n", encoding="utf-8")
    assert human_pairs(str(good), limit=4, seed=0)[0]["p_chosen"] == 0.75
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": "yes"}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 2: p_chosen must be a number from 0 to 1"):
        human_pairs(str(bad), limit=4, seed=0)
    # HH-RLHF's own files are gzipped transcripts.
    hh = tmp_path / "hh.jsonl.gz"
    hh.write_bytes(gzip.compress((json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
                                              "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}) + "\n").encode()))
    assert human_pairs(str(hh), limit=4, seed=0) == [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}]


def test_a_running_judge_serves_one_constitution_and_bad_input_is_named_before_any_judge_starts(tmp_path):
    with pytest.raises(JudgeEvalError, match="serves one constitution"):
        run_judge_eval(JudgeEvalJob(out=tmp_path, judge_url="http://127.0.0.1:9", constitutions=["concise", "harmless-helpful"]))
    result = CliRunner().invoke(app, ["judge", "eval", "--out", str(tmp_path), "--constitutions", "concise,no-such-constitution"])
    assert result.exit_code == 1 and "no-such-constitution" in result.output


def test_judge_eval_against_the_real_judge(judge, judge_constitution, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"How do I do task {i}?", "chosen": f"Here is how to do task {i}: step one.", "rejected": "No.",
             **({"p_chosen": 0.8 if i % 4 == 1 else 0.1} if i % 2 else {})} for i in range(6)]  # 0.1: most people chose "No."
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    job = JudgeEvalJob(pairs=str(pairs), constitutions=[str(judge_constitution)], judge_url=judge.url, out=tmp_path / "out",
                       judge_cache=tmp_path / "cache.sqlite")
    summary = run_judge_eval(job)
    doc = json.loads((tmp_path / "out" / "judge-eval.json").read_text())
    judged = [json.loads(line) for line in (tmp_path / "out" / "judged.jsonl").read_text().splitlines()]
    assert summary["n_pairs"] == doc["n_pairs"] == len(judged) == 6
    mine = doc["constitutions"][str(judge_constitution)]
    for r in judged:
        assert r["p_chosen"] == pytest.approx(r["p_a"] if r["chosen_in_a"] else 1 - r["p_a"])
        label = rows[[row["prompt"] for row in rows].index(human_pairs(str(pairs), 6, 0)[r["pair"]]["prompt"])].get("p_chosen", 1.0)
        # Agreement is with the people's majority (p_chosen 0.1: they preferred "rejected"), a judge tie half.
        people_side = 1.0 if label >= 0.5 else 0.0
        assert r["agree"] == (0.5 if r["p_chosen"] == 0.5 else float((r["p_chosen"] > 0.5) == (people_side == 1.0)))
        assert r["y_a"] == pytest.approx(label if r["chosen_in_a"] else 1 - label)
        assert len(r["by_principle"]) == 1 and 0.0 <= r["option_mass"] <= 1.0
    assert mine["agreement"]["value"] == pytest.approx(sum(r["agree"] for r in judged) / 6)
    assert mine["position_consistency"]["value"] == pytest.approx(sum(not r["same_position"] for r in judged) / 6)
    assert mine["hash"] == judged[0]["constitution_hash"]
    page = (tmp_path / "out" / "judge-eval.html").read_text()
    assert page.count("<img") == 2 and "agreement with people" in page
    # A rerun of the same command answers from the cache: the same judgements.
    run_judge_eval(job)
    assert [json.loads(line) for line in (tmp_path / "out" / "judged.jsonl").read_text().splitlines()] == judged
    # Every principle for every pair: one verdict per principle.
    each = run_judge_eval(job.model_copy(update={"each_principle": True, "limit": 2, "out": tmp_path / "each"}))
    assert each["n_pairs"] == 2
    rows_each = [json.loads(line) for line in (tmp_path / "each" / "judged.jsonl").read_text().splitlines()]
    from cai.constitution import load_constitution

    assert all(len(r["by_principle"]) == len(load_constitution(judge_constitution).principles) for r in rows_each)


def test_agreement_is_with_the_peoples_majority_and_a_judge_tie_counts_half():
    from cai.judge_eval import agreement

    # The judge's probability that the answer people labelled "chosen" is better, against the share of people preferring it.
    assert agreement(0.9, 1.0) == 1.0 and agreement(0.1, 1.0) == 0.0
    assert agreement(0.9, 0.1) == 0.0 and agreement(0.2, 0.1) == 1.0  # most people preferred "rejected"
    assert agreement(0.5, 1.0) == agreement(0.5, 0.1) == 0.5  # a fully position-biased judge says 0.5: half, either slot
    assert agreement(0.7, 0.5) == 1.0  # people split evenly: "chosen" is their side, as the reward model's accuracy reads it
    rows = [{"p_a": 0.5, "y_a": 1.0, "agree": 0.5, "same_position": True, "option_mass": 0.9, "by_principle": {"a": 0.5}},
            {"p_a": 0.5, "y_a": 0.0, "agree": 0.5, "same_position": True, "option_mass": 0.9, "by_principle": {"a": 0.5}},
            {"p_a": 0.8, "y_a": 0.9, "agree": 1.0, "same_position": False, "option_mass": 0.9, "by_principle": {"a": 1.0}},
            {"p_a": 0.8, "y_a": 0.1, "agree": 0.0, "same_position": False, "option_mass": 0.9, "by_principle": {"a": 0.0}}]
    f = figures(rows, seed=0)
    assert f["agreement"]["value"] == f["per_principle"]["a"]["value"] == 0.5 and f["agreement_ties"] == 2
    assert 0.0 < f["agreement"]["low"] < 0.5 < f["agreement"]["high"] < 1.0
