"""The content-addressed judge cache (`cai.judge_cache`)."""

from __future__ import annotations

from cai.judge_cache import JudgeCache
from judge_server import protocol as P


def test_judge_cache_is_content_addressed(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    req = P.ScoreRequest(prompt="q", response="r")
    result = P.ScoreResult(score=0.1, expected_rating=6.0, rating_probs=[0.1] * 10, option_mass=0.5, principle_id="p",
                           constitution_hash="h" * 64, model="m")
    k = JudgeCache.key("score", "m", "h" * 64, req)
    assert k != JudgeCache.key("score", "m", "g" * 64, req) != JudgeCache.key("score", "m", "h" * 64, req.model_copy(update={"seed": 1}))
    assert cache.get(k, P.ScoreResult) is None
    cache.put(k, result)
    assert cache.get(k, P.ScoreResult) == result and (cache.hits, cache.misses) == (1, 1)
