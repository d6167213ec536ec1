"""The one judge connection (`cai.judge`): constitution pinning and the synchronous face PPO uses, over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from cai.constitution import bundled_constitutions, load_constitution
from cai.judge import ConstitutionMismatchError, Judge, SyncJudge
from cai.judge_client import JudgeClient
from judge_server import protocol as P
from tests.conftest import JUDGE_KEY


@pytest.mark.slow
def test_a_job_given_another_constitution_is_refused_before_any_request(judge):
    other = load_constitution(bundled_constitutions()["concise"])

    async def connect():
        async with JudgeClient(judge.url, api_key=JUDGE_KEY) as client:
            await Judge.connect(client, None, other)

    with pytest.raises(ConstitutionMismatchError, match=r"serves constitution harmless-helpful .* but this job was given concise"):
        asyncio.run(connect())


@pytest.mark.slow
def test_sync_judge_scores_with_one_connection_pinned_to_the_served_constitution(judge):
    sync = SyncJudge(judge.url, api_key=JUDGE_KEY)
    try:
        served = sync.judge.constitution_hash
        first = sync.score_many([P.ScoreRequest(prompt="How do I stay safe online?", response="Use strong passwords.")])
        again = sync.score_many([P.ScoreRequest(prompt="How do I stay safe online?", response="Use strong passwords.")])
    finally:
        sync.close()
        sync.close()  # closing twice is harmless (PPO's reward and gold scorer share one)
    (a,), (b,) = first, again
    assert a.constitution_hash == served and -1.0 <= a.score <= 1.0 and a.score == pytest.approx(b.score)
