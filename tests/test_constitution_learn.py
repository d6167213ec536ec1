"""`cai constitution learn` and the studio's disagreements and suggest action (Inverse Constitutional AI) against the real
judge on the tiny model: the reply parser on fixed texts, the judge's /v1/propose and comparisons under a question given in
the request, held-out figures recomputed from the judge's own labels, a proposal that does not help not offered, the
command idempotent with its output file checked, bad pairs files named by line, and accepting a suggestion in the studio."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager

import httpx
import pytest
from typer.testing import CliRunner

from cai.constitution import load_constitution, parse_constitution
from cai.constitution.learn import (
    Asker,
    SuggestOptions,
    evaluate,
    judge_all,
    learned_principle,
    parse_proposal,
    question_requests,
    split,
    suggest,
)
from cai.human_labels import agreement
from cai.judge_eval import placements
from judge_server import protocol as P
from tests.conftest import JUDGE_KEY
from tests.studio_server import PAIRS, SMALL_CONSTITUTION, page_token, running_studio

# -- the reply parser, on fixed texts ---------------------------------------------------------------------------------

WELL_FORMED = [
    ("Which response is more honest about what it does not know?", "Which response is more honest about what it does not know?"),
    ("Which response refuses to help with crimes? It is the safer one.", "Which response refuses to help with crimes?"),
    ("1. **Principle:** Which response avoids giving dangerous instructions?",
     "Which response avoids giving dangerous instructions?"),
    ("Sure! Here is one.\n\"Which response respects the user's privacy better?\"", "Which response respects the user's privacy better?"),
    ("Question: which response   answers the question that was asked?", "which response answers the question that was asked?"),
    ("Choose the response that declines harmful requests politely.", "Choose the response that declines harmful requests politely."),
]
MALFORMED = ["", "   \n\n", "Which response", "Which response xq#@ ?", "Which response\x00\x01?", "Which is better?",
             "The first response is better because it is kind.", "Which response " + "very " * 80 + "long?",
             "Which response}}{{ ]] [[ ))?", "?" * 40, "Which reply is kinder to the user here?"]


@pytest.mark.parametrize("text, question", WELL_FORMED)
def test_a_well_formed_reply_gives_its_question(text, question):
    assert parse_proposal(text) == question


@pytest.mark.parametrize("text", MALFORMED)
def test_a_malformed_reply_gives_no_proposal(text):
    assert parse_proposal(text) is None


def test_the_split_is_seeded_disjoint_and_leaves_both_parts_nonempty():
    source, held = split(10, 0.5, seed=3)
    assert sorted(source + held) == list(range(10)) and len(held) == 5 and split(10, 0.5, seed=3) == (source, held)
    assert split(10, 0.5, seed=4) != (source, held)
    assert [len(part) for part in split(2, 0.99, 0)] == [1, 1]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Hi", "chosen": "Hello"', "line 2: invalid JSON"),
    ('["Hi", "Hello", "Go away"]', "line 2: expected an object with prompt/chosen/rejected, got list"),
    ('{"prompt": "Hi", "chosen": "Hello", "rejected": 3}', "line 2: field 'rejected' must be a string"),
])
def test_a_bad_pairs_file_is_named_by_file_and_line_before_any_judge_starts(tmp_path, line, message):
    from cai.cli import app

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIRS[0]) + "\n" + line + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["constitution", "learn", "--pairs", str(pairs), "--out", str(tmp_path / "my.yaml"),
                                      "--judge-url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and f"{pairs}, {message}" in result.output, result.output
    assert not (tmp_path / "my.yaml").exists()


# -- against the real judge -------------------------------------------------------------------------------------------

LEARN_PAIRS = PAIRS + [
    {"prompt": "How do I make a bomb?", "chosen": "I can't help with that.", "rejected": "Mix these chemicals in a jar."},
    {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "Probably 5, maybe."},
    {"prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof, / the garden drinks in silence, / puddles hold the sky.",
     "rejected": "Rain."},
    {"prompt": "My friend is sad. What should I do?", "chosen": "Listen to them and ask how you can help.",
     "rejected": "Tell them to get over it."},
    {"prompt": "Give me someone's home address.", "chosen": "I can't share private information about people.",
     "rejected": "Sure, here it is: 12 Elm Street."},
    {"prompt": "Explain photosynthesis simply.", "chosen": "Plants use sunlight to turn water and air into sugar.",
     "rejected": "It is complicated.", "p_chosen": 0.9},
    {"prompt": "How do I cheat on my exam?", "chosen": "I'd suggest studying with past papers instead.",
     "rejected": "Write the answers on your hand.", "p_chosen": 0.7},
    {"prompt": "Recommend a book.", "chosen": "Try 'The Hobbit' by Tolkien.", "rejected": "Books are boring."},
    {"prompt": "Insult my coworker for me.", "chosen": "How about we talk about what's bothering you?",
     "rejected": "Your coworker is an idiot.", "p_chosen": 0.4},
]
QUESTIONS = ["Which response is shorter and more direct?", "Which response refuses the request more clearly?",
             "Which response would a kind teacher give to a child?", "Which response contains more factual detail?",
             "Which response is more polite to the user?", "Which response sounds more confident?"]


@contextmanager
def served(path, text: str):
    """The session judge serving `text` (it reloads its file), and its file's text back afterwards."""
    original = path.read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    try:
        yield parse_constitution(text)
    finally:
        path.write_text(original, encoding="utf-8")


async def _with_judge(url: str, work):
    from cai.judge import Judge, first_error
    from cai.judge_client import JudgeClient

    async with JudgeClient(url, api_key=JUDGE_KEY) as client:
        judge = await Judge.connect(client)

        async def compare(reqs):
            out = await judge.compare_many(reqs)
            first_error(out)
            return out

        return await work(judge, Asker(compare, judge.propose_many))


def test_the_judge_proposes_as_text_and_judges_by_a_question_given_in_the_request(judge, judge_constitution):
    """/v1/propose answers text for any pairs (a batch too long for the prompt keeps the pairs that fit); a comparison under
    a question given in the request votes as 'proposed' and equals the same text asked as the constitution's principle."""
    long_pair = P.PreferredPair(prompt="Tell me about rivers. " * 40, preferred="Rivers flow to the sea. " * 40, other="No.")
    too_long = P.PreferredPair(prompt="Tell me about rivers. " * 60, preferred="Rivers flow to the sea. " * 60, other="No.")

    async def work(j, ask):
        replies = await j.propose_many([P.ProposeRequest(pairs=[P.PreferredPair(prompt=p["prompt"], preferred=p["chosen"],
                                                                                other=p["rejected"]) for p in PAIRS], seed=1),
                                        P.ProposeRequest(pairs=[long_pair] * 4, seed=2), P.ProposeRequest(pairs=[too_long], seed=3)])
        a, b = PAIRS[0]["chosen"], PAIRS[0]["rejected"]
        by_question = await ask.compare([P.CompareRequest(prompt=PAIRS[0]["prompt"], response_a=a, response_b=b,
                                                          comparison="Which response is less harmful?")])
        by_id = await ask.compare([P.CompareRequest(prompt=PAIRS[0]["prompt"], response_a=a, response_b=b, principle_ids=["harmless"])])
        return replies, by_question[0], by_id[0]

    with served(judge_constitution, SMALL_CONSTITUTION):
        replies, by_question, by_id = asyncio.run(_with_judge(judge.url, work))
    assert "limit is 1536" in str(replies[2])  # one pair alone too long: that proposal's own error, in its place
    for reply in replies[:2]:
        assert isinstance(reply, P.ProposeResult), reply
        assert reply.text.startswith("Which response") and 0 < reply.completion_tokens <= 64
    assert replies[1].prompt_tokens <= 1536  # four pairs do not fit the judge's 1536 tokens: dropped until it fit, not refused
    assert by_question.principle_ids == [P.PROPOSED_ID] and by_id.principle_ids == ["harmless"]
    assert by_question.p_a == pytest.approx(by_id.p_a, abs=1e-6)  # the same question, however it is given
    with pytest.raises(ValueError, match="not both"):
        P.CompareRequest(prompt="x", response_a="a", response_b="b", comparison="Which?", principle_ids=["harmless"])


def _answer(p_a: float, pid: str) -> P.CompareResult:
    vote = P.PrincipleVote(principle_id=pid, p_a=p_a, p_a_shown_first=p_a, p_a_shown_second=p_a, option_mass=1.0)
    return P.CompareResult(p_a=p_a, p_a_shown_first=p_a, p_a_shown_second=p_a, same_position=False, option_mass=1.0, votes=[vote],
                           principle_ids=[pid], constitution_hash="h", model="m")


@pytest.mark.parametrize("question_p, change, helps", [
    ([0.9, 0.9, 0.1, 0.6], 0.25, True),    # flips pairs 0 and 1 toward people, pair 2 away: +2 -1 of 4
    ([0.6, 0.55, 0.1, 0.6], -0.25, False),  # flips pair 2 away only
    ([0.6, 0.6, 0.6, 0.6], 0.0, False),     # too weak to flip any: no change, not offered
])
def test_the_held_out_figures_by_hand(question_p, change, helps):
    """Two principles voting p(chosen in A) per pair, people choosing chosen, chosen always in A; the question's vote averaged in."""
    constitution = parse_constitution(SMALL_CONSTITUTION)
    pairs = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    base = [[0.3, 0.4], [0.45, 0.4], [0.55, 0.6], [0.8, 0.7]]  # agreement before: pairs 2 and 3, 2/4
    by_pair = [[_answer(x, "harmless"), _answer(y, "helpful")] for x, y in base]
    figures = evaluate("Which response is kinder to the user?", constitution, pairs, [True] * 4, [0, 1, 2, 3], by_pair,
                       [_answer(p, P.PROPOSED_ID) for p in question_p], seed=0)
    alone = sum(p > 0.5 for p in question_p) / 4
    assert figures["agreement_before"]["value"] == 0.5 and figures["agreement_alone"]["value"] == alone
    assert figures["change"]["value"] == pytest.approx(change) and figures["agreement_with"]["value"] == pytest.approx(0.5 + change)
    assert figures["change"]["low"] <= change <= figures["change"]["high"] and figures["helps"] is helps


SCRIPTED_REPLIES = ["Which response is shorter and more direct?", "Which response is shorter and more direct? Yes.",  # one twice
                    "Which response is less harmful?",  # already the constitution's own question
                    "Which response xq#@ ?", "", "1. Principle: Which response is more polite to the user?"]


def test_proposals_are_parsed_and_tested_on_held_out_pairs_by_the_judges_real_labels(judge, judge_constitution):
    """The tiny model writes no questions, so the replies here are fixed texts (well-formed and garbage) standing in for
    the model's; everything else is the real judge: every figure is recomputed from its answers, nothing that does not
    raise agreement is offered, and garbage is no proposal."""

    async def work(j, ask):
        async def scripted(reqs):
            assert all(1 <= len(r.pairs) <= 3 for r in reqs)  # the disagreements, batch 3
            return [P.ProposeResult(text=t, constitution_hash="h", model="m", prompt_tokens=1, completion_tokens=1)
                    for t in SCRIPTED_REPLIES[:len(reqs)]]

        chosen_first = placements(LEARN_PAIRS, 0)
        measured = await judge_all(ask, constitution, LEARN_PAIRS, chosen_first, 0)
        options = SuggestOptions(proposals=len(SCRIPTED_REPLIES))
        result = await suggest(Asker(ask.compare, scripted), constitution, LEARN_PAIRS, chosen_first, options, measured)
        answers = {c["question"]: await ask.compare(question_requests(LEARN_PAIRS, chosen_first, result["held_out_pairs"],
                                                                      c["question"], 0)) for c in result["candidates"]}
        return chosen_first, measured, result, answers

    with served(judge_constitution, SMALL_CONSTITUTION) as constitution:
        chosen_first, (rows, by_pair), result, answers = asyncio.run(_with_judge(judge.url, work))
    assert result["disagreements"] > 0, "the tiny judge agreed with people everywhere: nothing to propose from"
    assert [r["question"] for r in result["replies"]] == [parse_proposal(t) for t in SCRIPTED_REPLIES]
    assert [c["question"] for c in result["candidates"]] == ["Which response is shorter and more direct?",
                                                             "Which response is more polite to the user?"]
    held = result["held_out_pairs"]
    people = [LEARN_PAIRS[i].get("p_chosen", 1.0) for i in held]
    before = sum(rows[i]["agree"] for i in held) / len(held)
    for c in result["candidates"]:
        mine = answers[c["question"]]
        alone = [agreement(a.p_a if chosen_first[i] else 1 - a.p_a, h) for i, a, h in zip(held, mine, people)]
        with_it = [agreement(sum(r.p_a for r in [*by_pair[i], a]) / 3 if chosen_first[i] else 1 - sum(r.p_a for r in [*by_pair[i], a]) / 3, h)
                   for i, a, h in zip(held, mine, people)]
        assert c["agreement_alone"]["value"] == pytest.approx(sum(alone) / len(held))
        assert c["agreement_before"]["value"] == pytest.approx(before)
        assert c["agreement_with"]["value"] == pytest.approx(sum(with_it) / len(held))
        assert c["change"]["value"] == pytest.approx((sum(with_it) - len(held) * before) / len(held))
        assert c["helps"] == (c["change"]["value"] > 0)
    assert result["offered"] == [c for c in result["candidates"] if c["change"]["value"] > 0]


def test_learn_writes_only_what_helped_annotated_and_a_second_run_writes_the_same_file(judge, judge_constitution, tmp_path,
                                                                                         monkeypatch):
    from cai.cli import app

    monkeypatch.setenv(P.API_KEY_ENV, JUDGE_KEY)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in LEARN_PAIRS), encoding="utf-8")
    out = tmp_path / "my.yaml"
    args = ["constitution", "learn", "--pairs", str(pairs), "--out", str(out), "--judge-url", judge.url, "--constitution",
            str(judge_constitution), "--judge-cache", str(tmp_path / "cache.sqlite"), "--proposals", "3", "--seed", "1"]
    with served(judge_constitution, SMALL_CONSTITUTION) as constitution:
        first = CliRunner().invoke(app, args)
        assert first.exit_code == 0, first.output
        text, report = out.read_text(encoding="utf-8"), json.loads(out.with_suffix(".learn.json").read_text())
        second = CliRunner().invoke(app, args)
        assert second.exit_code == 0, second.output
    assert out.read_text(encoding="utf-8") == text and json.loads(out.with_suffix(".learn.json").read_text()) == report
    assert "proposal(s) tested on" in first.output and f"written to {out}" in first.output
    assert len(report["replies"]) == 3 and all(r["question"] == parse_proposal(r["text"]) for r in report["replies"])
    assert sorted(report["proposal_pairs"] + report["held_out_pairs"]) == list(range(len(LEARN_PAIRS)))
    assert all(c["helps"] == (c["change"]["value"] > 0) for c in report["candidates"])
    learned = load_constitution(out)
    kept = [learned_principle(c["question"]) for c in report["offered"]]
    assert learned.principles == constitution.principles + kept  # nothing that did not help is written
    assert "# This comment block must survive" in text  # the base file's comments kept
    assert text.count("# learned by cai constitution learn on") == len(kept)


# -- the studio -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studio(judge, judge_constitution, tmp_path_factory):
    with running_studio(judge.url, judge_constitution, tmp_path_factory.mktemp("studio-learn")) as url, \
            httpx.Client(base_url=url, timeout=300) as client:
        client.headers["X-Studio-Token"] = page_token(client)
        yield client, judge_constitution


def test_the_studio_lists_disagreements_suggests_and_accepts_through_the_version_check(studio):
    client, path = studio
    assert client.get("/api/disagreements").status_code == 409  # nothing measured yet
    assert client.post("/api/suggest", json={}).status_code == 409
    assert client.post("/api/people/run").status_code == 200
    for _ in range(600):
        report = client.get("/api/people").json()
        if report["progress"]["state"] != "running":
            break
        time.sleep(0.2)
    assert report["progress"]["state"] == "done", report["progress"]
    listed = client.get("/api/disagreements").json()
    assert listed["n_pairs"] == len(PAIRS) and listed["version"] == report["current"]["hash"]
    assert [d["wrong_by"] for d in listed["pairs"]] == sorted((d["wrong_by"] for d in listed["pairs"]), reverse=True)
    for d in listed["pairs"]:
        pair = next(p for p in PAIRS if p["prompt"] == d["prompt"])  # the studio holds them in its seeded order
        assert (d["chosen"], d["rejected"]) == (pair["chosen"], pair["rejected"])
        assert set(d["by_principle"]) == {"harmless", "helpful"}
        assert d["judge_p_chosen"] == pytest.approx(sum(d["by_principle"].values()) / 2)  # the mean of the principles' votes
        people_first = pair.get("p_chosen", 1.0) >= 0.5
        assert d["wrong_by"] == pytest.approx(0.5 - d["judge_p_chosen"] if people_first else d["judge_p_chosen"] - 0.5) and d["wrong_by"] > 0
    assert len(listed["pairs"]) == listed["n_disagree"] == round(len(PAIRS) * (1 - report["current"]["figures"]["agreement"]["value"]))
    suggested = client.post("/api/suggest", json={"proposals": 2})
    assert suggested.status_code == 200, suggested.text
    s = suggested.json()
    assert len(s["replies"]) == (2 if s["disagreements"] else 0)
    assert all(r["question"] == parse_proposal(r["text"]) for r in s["replies"])
    assert all(c["helps"] for c in s["offered"]) and all(c["card"]["id"].startswith("learned-") for c in s["offered"])
    # Accepting a card is a save of a new principle: the file's version checked, written atomically.
    view = client.get("/api/constitution").json()
    card = learned_principle(QUESTIONS[0]).model_dump(exclude={"weight"})
    stale = client.put("/api/constitution", json={"base": "0" * 64, "edits": [{"index": None, **card}]})
    assert stale.status_code == 409 and card["id"] not in path.read_text(encoding="utf-8")
    saved = client.put("/api/constitution", json={"base": view["file_hash"], "edits": [{"index": None, **card}]})
    assert saved.status_code == 200, saved.text
    written = parse_constitution(path.read_text(encoding="utf-8"))
    assert [p.id for p in written.principles] == ["harmless", "helpful", card["id"]]
    assert written.principles[-1] == learned_principle(QUESTIONS[0]) and saved.json()["in_service"]["hash"] == written.hash
    assert "# This comment block must survive" in path.read_text(encoding="utf-8")



def test_the_studios_proposals_keep_a_failed_one_in_its_place(judge, judge_constitution, tmp_path):
    """A proposal the judge refuses (its one pair too long) is that proposal's error; the others are still answered and
    cached (the studio's suggest goes on, as the command does, instead of failing the whole action)."""
    from cai.judge import JudgeError
    from cai.judge_cache import JudgeCache
    from cai.judge_client import JudgeClient
    from cai.studio.judging import StudioJudge
    from cai.studio.suggest import _asker

    ok = P.ProposeRequest(pairs=[P.PreferredPair(prompt=PAIRS[0]["prompt"], preferred=PAIRS[0]["chosen"], other=PAIRS[0]["rejected"])],
                          seed=1)
    too_long = P.ProposeRequest(pairs=[P.PreferredPair(prompt="Tell me about rivers. " * 60, preferred="Rivers flow. " * 90,
                                                       other="No.")], seed=2)

    async def work():
        async with JudgeClient(judge.url, api_key=JUDGE_KEY) as client:
            studio_judge = StudioJudge(client, JudgeCache(tmp_path / "cache.sqlite"), "tiny", max_tokens=32)
            return await _asker(studio_judge, parse_constitution(SMALL_CONSTITUTION)).propose([ok, too_long])

    with served(judge_constitution, SMALL_CONSTITUTION):
        first = asyncio.run(work())
        again = asyncio.run(work())  # the answered one from the cache, the refused one asked again and refused again
    assert isinstance(first[0], P.ProposeResult) and isinstance(first[1], JudgeError), first
    assert again[0] == first[0] and isinstance(again[1], JudgeError)
