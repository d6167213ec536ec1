"""What `cai eval` reads besides the models' answers (`cai.evaluate`): a PPO run's history and the
preference data's position bias, as the monitors get them."""

from __future__ import annotations

import json

from cai.evaluate import prefs_same_position, training_history
from cai.train import ppo_metrics as M


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
