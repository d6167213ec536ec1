"""What `cai eval` reads besides the models' answers (`cai.evaluate`): a PPO run's history and the
preference data's position bias, as the monitors get them."""

from __future__ import annotations

import json

import pytest

from cai.evaluate import prefs_same_position, training_history
from cai.human_labels import human_pairs
from cai.train.rl import metrics as M


def test_training_history_reads_lengths_and_proxy_vs_gold_and_skips_a_partial_line(tmp_path):
    rows = [{"step": 1, M.LENGTH_MEAN: 10.0, M.KL: 0.1}, {"step": 2, M.LENGTH_MEAN: 12.0, M.KL: 0.3, M.PROXY_SCORE: 0.5, M.JUDGE_SCORE: 0.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "respo')
    lengths, hacking = training_history(tmp_path)
    assert lengths == [{"step": 1, "length_mean": 10.0}, {"step": 2, "length_mean": 12.0}]
    assert hacking == [{"step": 2, "kl": 0.3, "proxy": 0.5, "gold": 0.2}]
    assert training_history(None) == ([], []) and training_history(tmp_path / "missing") == ([], [])


def test_prefs_same_position_reads_the_pairs_that_have_it(tmp_path):
    rows = [{"same_position": True}, {"same_position": False}, {"status": "judge_failed"}]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prefs_same_position(tmp_path) == [True, False]
    assert prefs_same_position(None) == []


def test_the_shipped_human_pairs_are_single_turn_hh_pairs_and_a_missing_file_names_the_built_in_set(tmp_path):
    from cai.train.data import DatasetError

    pairs = human_pairs("hh-harmless", limit=64, seed=0)
    assert len(pairs) == 48 and len({p["prompt"] for p in pairs}) == 48
    assert all(p["prompt"] and p["chosen"] and p["rejected"] and p["chosen"] != p["rejected"] for p in pairs)
    assert not any("Human:" in p["chosen"] or "Assistant:" in p["chosen"] for p in pairs)  # the answer only, not the transcript
    assert [p["prompt"] for p in human_pairs("hh-harmless", limit=5, seed=0)] == [p["prompt"] for p in pairs[:5]]
    with pytest.raises(DatasetError, match=r"nope.jsonl: no such file .*or a built-in set: hh-harmless"):
        human_pairs(str(tmp_path / "nope.jsonl"), limit=4, seed=0)


def test_judge_agreement_with_people_follows_their_majority_and_counts_a_tie_half():
    from cai.human_labels import human_agreement
    from judge_server import protocol as P

    def judged(p_a: float) -> P.CompareResult:
        return P.CompareResult(p_a=p_a, p_a_shown_first=p_a, p_a_shown_second=p_a, same_position=False, option_mass=1.0,
                               votes=[], principle_ids=["p"], constitution_hash="h", model="m")

    labelled = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0.1},
                {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0.2}]
    # The judge prefers chosen (slot A) on all but the last, where it is undecided: right, wrong (people chose b), right, half.
    got = human_agreement([judged(0.9), judged(0.9), judged(0.7), judged(0.5)], labelled)
    assert got["value"] == pytest.approx(2.5 / 4) and got["n"] == 4
