"""The one judge connection (`cai.judge`): constitution pinning and the synchronous face PPO uses, over HTTP."""

from __future__ import annotations

import asyncio
import inspect

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


def test_every_judged_job_takes_its_judge_settings_and_policy_backend_from_one_place():
    from cai.cli_options import settings_command
    from cai.evaluate import EvalJob
    from cai.generate.common import DEFAULT_POLICY_BACKEND, GenerationJob
    from cai.generate.prefs import PrefsJob
    from cai.generate.sft import SftJob
    from cai.judge import JudgeConnection, JudgeSettings
    from cai.judge_eval import JudgeEvalJob
    from cai.models import DEFAULT_MODEL

    def same(job, piece, names):
        for name in names:
            mine, shared = job.model_fields[name], piece.model_fields[name]
            assert (mine.default, mine.description) == (shared.default, shared.description), (job.__name__, name)

    for job in (SftJob, PrefsJob, EvalJob):
        assert issubclass(job, JudgeSettings)
        same(job, JudgeSettings, JudgeSettings.model_fields)
        assert job.model_fields["policy_backend"].default == DEFAULT_POLICY_BACKEND
        assert job.model_fields["policy_backend"].annotation == GenerationJob.model_fields["policy_backend"].annotation
    assert issubclass(JudgeEvalJob, JudgeConnection) and not issubclass(JudgeEvalJob, JudgeSettings)  # it takes several
    same(JudgeEvalJob, JudgeConnection, ["judge_url", "judge_retries"])
    assert JudgeEvalJob.model_fields["judge_model"].default == DEFAULT_MODEL  # no policy to fall back on
    # The flags users type are the fields' names, as before the settings were shared.
    for job, flags in ((SftJob, {"judge_url", "judge_model", "judge_retries", "constitution"}),
                       (EvalJob, {"judge_url", "judge_model", "judge_retries", "constitution"}),
                       (JudgeEvalJob, {"judge_url", "judge_model", "judge_retries", "constitutions"})):
        assert flags <= set(inspect.signature(settings_command(job, print)).parameters), job.__name__


def test_compare_all_asks_in_chunks_and_stops_at_the_first_error():
    from cai.judge import compare_all
    from cai.judge_client import JudgeItemError

    class Judged:
        def __init__(self, fail_at: int | None = None):
            self.batches, self.fail_at = [], fail_at

        async def compare_many(self, reqs):
            self.batches.append(len(reqs))
            return [JudgeItemError(i, "bad_request", "no") if r.seed == self.fail_at else
                    P.CompareResult.model_construct(p_a=0.5) for i, r in enumerate(reqs)]

    reqs = [P.CompareRequest(prompt="q", response_a="a", response_b="b", seed=i) for i in range(5)]
    judge = Judged()
    assert len(asyncio.run(compare_all(judge, reqs, "test", chunk=2))) == 5 and judge.batches == [2, 2, 1]
    with pytest.raises(JudgeItemError, match="no"):
        asyncio.run(compare_all(Judged(fail_at=3), reqs, "test", chunk=2))


def test_a_judge_started_here_needs_a_model_and_a_constitution_file():
    from cai.judge import JudgeConnection, open_judge

    async def open_one():
        async with open_judge(JudgeConnection(), constitution=None, constitution_path=None, default_model="m"):
            pass

    with pytest.raises(ValueError, match="needs a model .* and a constitution file"):
        asyncio.run(open_one())
