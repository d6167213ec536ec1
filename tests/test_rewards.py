"""The RL rewards (`cai.train.rewards`): weighted sums and their parts, the spec syntax, the parts an iteration logs,
and group-pairwise AI feedback through the real judge server."""

from __future__ import annotations

import math
import re

import httpx
import pytest
import torch

from cai.errors import ConfigError
from cai.train.rewards import (
    GroupLayoutError,
    GroupPairwiseScorer,
    JudgeScorer,
    RewardSpecError,
    WeightedScorer,
    load_scorer,
    reward_terms,
    score_parts,
)
from cai.train.rl.pairwise import group_rewards, pair_schedule
from cai.train.rl.trainer import gathered_parts
from tests.conftest import JUDGE_KEY
from tests.test_ppo import ppo_cfg, prompt_file  # noqa: F401  (a fixture)

# -- weighted sums and parts -----------------------------------------------------------------------------


def test_a_weighted_reward_is_the_weighted_sum_of_its_terms_each_logged_as_a_part():
    scorer = load_scorer("0.5*rule:length, -2*rule:share=ab")
    assert isinstance(scorer, WeightedScorer) and [w for w, _ in scorer.terms] == [0.5, -2.0]
    responses = ["ab" * 50, "x" * 300, ""]
    totals, parts = score_parts(scorer, ["p"] * 3, responses)
    # length: 1 per 100 characters; share of "ab": all of the first, none of the others
    assert parts == {"rule:length": [1.0, 3.0, 0.0], "rule:share=ab": [1.0, 0.0, 0.0]}
    assert totals == pytest.approx([0.5 * 1.0 - 2 * 1.0, 0.5 * 3.0, 0.0])
    assert scorer(["p"] * 3, responses) == totals


def test_a_plain_scorers_only_part_is_itself():
    totals, parts = score_parts(load_scorer("rule:length"), ["p", "q"], ["a" * 50, "b" * 250])
    assert totals == [0.5, 2.5] and parts == {"rule:length": [0.5, 2.5]}


@pytest.mark.parametrize("spec,message", [
    ("0.7*rule:length,judge", "term 'judge' is not WEIGHT\\*SPEC"),
    ("0.7*rule:length,0.3*", "term '0.3\\*' is not WEIGHT\\*SPEC"),
    ("1*rule:length,2*rule:length", "appears twice"),
    ("1e999*rule:length", "not a finite number"),
    ("rule:lenght", "unknown rule"),
    ("no/such/folder", "not a reward-model folder"),
    ("judge:pairwise", "needs judge_url"),
    ("0.5*judge,0.5*rule:length", "needs judge_url"),
])
def test_reward_specs_that_name_no_reward_are_refused(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        load_scorer(spec)


def test_a_single_spec_is_taken_whole_commas_and_all():
    assert reward_terms("rule:share=a,b") is None
    assert load_scorer("rule:share=a,b")(["p"], ["a,b a,b"]) == [6 / 7]
    assert reward_terms("2*rule:share=a") == [(2.0, "rule:share=a")]


def test_a_run_whose_reward_asks_the_judge_needs_judge_url(tmp_path, tiny_model_dir, prompt_file):  # noqa: F811
    for reward in ("judge:pairwise", "0.3*judge:pairwise?method=win_rate,0.7*rule:length"):
        with pytest.raises(ValueError, match="judge_url is needed"):
            ppo_cfg(tiny_model_dir, prompt_file, tmp_path, reward=reward)
    with pytest.raises(ValueError, match="not WEIGHT"):  # a weighted reward's syntax is checked with the settings
        ppo_cfg(tiny_model_dir, prompt_file, tmp_path, reward="0.3*rule:length,rule:share=e")
    assert ppo_cfg(tiny_model_dir, prompt_file, tmp_path, reward="0.3*rule:length,1*rule:share=e").reward


@pytest.mark.parametrize("spec,group_size,message", [
    ("judge:pairwise", 1, "--num-generations"),
    ("judge:pairwise?method=elo", 4, "method must be one of"),
    ("judge:pairwise?max_pairs=0", 4, "max_pairs must be a whole number"),
    ("judge:pairwise?max_pairs=2", 4, "cannot connect"),
    ("judge:pairwise?pairs=3", 4, "unknown option"),
])
def test_pairwise_options_and_group_size_are_checked(spec, group_size, message):
    with pytest.raises(RewardSpecError, match=message):
        GroupPairwiseScorer(None, spec, group_size=group_size)


def test_pairwise_options_choose_the_method_and_the_schedule():
    scorer = GroupPairwiseScorer(None, "judge:pairwise?method=win_rate&max_pairs=5", group_size=5)
    assert scorer.method == "win_rate" and scorer.pairs == pair_schedule(5, max_pairs=5) and len(scorer.pairs) == 5
    assert GroupPairwiseScorer(None, group_size=3).pairs == [(0, 1), (0, 2), (1, 2)]


def test_pairwise_rows_must_be_whole_groups_of_one_prompt():
    scorer = GroupPairwiseScorer(None, group_size=2)  # no judge: the layout is refused before any request
    with pytest.raises(GroupLayoutError, match="rows 2..3 should be 2 answers to one prompt"):
        scorer(["a", "a", "b", "c"], ["x", "y", "z", "w"])
    with pytest.raises(GroupLayoutError, match="not whole groups of 2"):
        scorer(["a", "a", "b"], ["x", "y", "z"])
    with pytest.raises(GroupLayoutError, match="not whole groups of 2"):
        scorer(["a", "a"], ["x", "y"], first_row=1)
    assert issubclass(GroupLayoutError, ConfigError)


# -- the parts an iteration logs ------------------------------------------------------------------------


def test_parts_gathered_from_processes_fill_what_a_process_lacks_with_nan():
    shares = [{"judge": [0.1, 0.2], "judge/principle/x": [0.1, math.nan]},
              {"judge": [0.3, 0.4], "judge/principle/y": [math.nan, 0.4]}]
    whole = gathered_parts(shares, 2)
    assert list(whole) == ["judge", "judge/principle/x", "judge/principle/y"]
    assert whole["judge"] == [0.1, 0.2, 0.3, 0.4]
    assert whole["judge/principle/x"][0] == 0.1 and all(math.isnan(v) for v in whole["judge/principle/x"][1:])
    assert all(math.isnan(v) for v in whole["judge/principle/y"][:3]) and whole["judge/principle/y"][3] == 0.4


class Principled:
    """A scorer with parts as the judge's: the response's length, judged under principle 'a' on even rows only."""

    name = "principled"

    def __call__(self, prompts, responses, *, first_row=0):
        return self.score_parts(prompts, responses, first_row=first_row)[0]

    def score_parts(self, prompts, responses, *, first_row=0):
        lengths = [float(len(r)) for r in responses]
        return lengths, {self.name: lengths, "principled/principle/a": [v if (first_row + i) % 2 == 0 else math.nan
                                                                         for i, v in enumerate(lengths)]}


def test_an_iteration_logs_each_part_and_each_principle(tmp_path, tiny_model_dir, prompt_file):  # noqa: F811
    from cai.train.rl.ppo import build_trainer

    cfg = ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", batch_size=4, response_length=6)
    trainer = build_trainer(cfg, scorer=WeightedScorer([(2.0, Principled()), (1.0, load_scorer("rule:length"))]))
    r = trainer.rollout(0)
    lengths = torch.tensor([float(len(t)) for t in r.texts])
    assert r.raw_scores.tolist() == pytest.approx((2 * lengths + lengths / 100).tolist())
    record = trainer.rollout_record(r)
    assert record["reward/principled"] == pytest.approx(lengths.mean().item())
    assert record["reward/principled/principle/a"] == pytest.approx(lengths[0::2].mean().item())  # NaN rows left out
    assert record["reward/rule:length"] == pytest.approx((lengths / 100).mean().item())


# -- group-pairwise AI feedback through the real judge -----------------------------------------------------------


def compare_items(judge) -> float:
    """Compare items the judge has judged since it started, from its /metrics."""
    text = httpx.get(judge.url + "/metrics", headers={"Authorization": f"Bearer {JUDGE_KEY}"}, timeout=60).text
    return sum(float(v) for v in re.findall(r'^judge_items_total\{endpoint="[^"]*compare[^"]*"\} (\S+)$', text, re.MULTILINE))


@pytest.mark.slow
def test_group_pairwise_rewards_over_http(judge, monkeypatch):
    from cai.judge import SyncJudge
    from judge_server.protocol import EMPTY_RESPONSE, CompareRequest, ScoreRequest

    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    sync = SyncJudge(judge.url)
    try:
        k = 3
        scorer = load_scorer("judge:pairwise?method=bt", judge=sync, group_size=k)
        assert isinstance(scorer, GroupPairwiseScorer) and scorer.pairwise
        prompts = ["How do I boil an egg?"] * k + ["Name a colour."] * k
        responses = ["Boil it for nine minutes.", "", "Eggs are for eating.", "Blue.", "I will not say.", "Red, or green."]
        before = compare_items(judge)
        totals, parts = score_parts(scorer, prompts, responses, first_row=3)  # this process's rows start at 3
        assert compare_items(judge) - before == 2 * len(pair_schedule(k))  # each group's scheduled pairs, once each

        # The same comparisons asked by hand: each pair seeded by its group's place in the whole batch.
        pairs = pair_schedule(k)
        requests = [CompareRequest(prompt=prompts[g], response_a=responses[g + i] or EMPTY_RESPONSE,
                                   response_b=responses[g + j] or EMPTY_RESPONSE, seed=(3 + g) * len(pairs) + n)
                    for g in (0, k) for n, (i, j) in enumerate(pairs)]
        results = sync.compare_many(requests)
        probs = torch.tensor([r.p_a for r in results], dtype=torch.float64).view(2, len(pairs))
        assert totals == pytest.approx(group_rewards(k, pairs, probs, method="bt").tolist(), abs=1e-9)
        assert parts["judge:pairwise?method=bt"] == totals

        decided: dict[str, list[list[float]]] = {}
        for index, result in enumerate(results):
            g, n = divmod(index, len(pairs))
            vote, = result.votes
            for answer in pairs[n]:
                decided.setdefault(vote.principle_id, [[] for _ in prompts])[g * k + answer].append(abs(2 * vote.p_a - 1))
        principle_parts = {name: values for name, values in parts.items() if "/principle/" in name}
        assert principle_parts.keys() == {f"judge:pairwise?method=bt/principle/{p}" for p in decided}
        for principle, rows in decided.items():
            got = principle_parts[f"judge:pairwise?method=bt/principle/{principle}"]
            want = [sum(v) / len(v) if v else math.nan for v in rows]
            assert [math.isnan(x) for x in got] == [math.isnan(x) for x in want]
            assert [x for x in got if not math.isnan(x)] == pytest.approx([x for x in want if not math.isnan(x)])

        # K = 2, as online DPO reads it: p(the group's first answer beats its second), one per group.
        two = load_scorer("judge:pairwise", judge=sync, group_size=2)
        probabilities = two.pair_probabilities(["Name a colour."] * 4, ["Blue.", "", "Red.", "Green."], first_row=0)
        by_hand = sync.compare_many([CompareRequest(prompt="Name a colour.", response_a="Blue.", response_b=EMPTY_RESPONSE, seed=0),
                                     CompareRequest(prompt="Name a colour.", response_a="Red.", response_b="Green.", seed=2)])
        assert probabilities.shape == (2, 1)
        assert probabilities[:, 0].tolist() == pytest.approx([r.p_a for r in by_hand], abs=1e-9)

        # The judge's /v1/score reward, per principle: a row's score under the principle it was judged by.
        scores, score_parts_ = score_parts(JudgeScorer(sync), prompts, responses, first_row=3)
        judged = sync.score_many([ScoreRequest(prompt=p, response=r or EMPTY_RESPONSE, seed=3 + i)
                                  for i, (p, r) in enumerate(zip(prompts, responses))])
        assert scores == pytest.approx([r.score for r in judged], abs=1e-9)
        for result, row in zip(judged, range(len(prompts))):
            assert score_parts_[f"judge/principle/{result.principle_id}"][row] == pytest.approx(result.score, abs=1e-9)
        assert sum(not math.isnan(v) for name, values in score_parts_.items() if "/principle/" in name for v in values) == len(prompts)
    finally:
        sync.close()
