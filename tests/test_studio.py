"""`cai studio`: card edits written into the file (comments kept), and the app over HTTP against the real judge
(the tiny model): loading, saving atomically, conflicts, edits on disk, broken edits, try-it, the against-people
run re-asking only what an edit changed, and the security rules."""

from __future__ import annotations

import asyncio
import difflib
import re
import time

import httpx
import pytest
from typer.testing import CliRunner

from cai.constitution import bundled_constitutions, parse_constitution, parse_text_constitution
from cai.studio.edits import CardEdit, apply_text, apply_yaml, text_cards, yaml_cards
from cai.studio.judging import flipped_pairs
from tests.studio_server import PAIRS, SMALL_CONSTITUTION, page_token, running_studio

# -- edits, without a judge ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(bundled_constitutions()))
def test_an_edit_of_one_field_changes_only_its_lines_and_keeps_every_comment(name):
    text = bundled_constitutions()[name].read_text(encoding="utf-8")
    assert apply_yaml(text, []) == text  # the shipped files round-trip byte for byte
    edited = apply_yaml(text, [CardEdit(index=1, comparison="Which response would a careful, kind expert give?")])
    old_lines, new_lines = text.splitlines(), edited.splitlines()
    assert [line for line in old_lines if line.lstrip().startswith("#")] == [line for line in new_lines if line.lstrip().startswith("#")]
    before, after = parse_constitution(text), parse_constitution(edited)
    assert after.principles[1].comparison == "Which response would a careful, kind expert give?"
    assert [p.model_dump() for i, p in enumerate(after.principles) if i != 1] == \
           [p.model_dump() for i, p in enumerate(before.principles) if i != 1]
    card = yaml_cards(text)[1]
    changed = [(i1 + 1, i2) for op, i1, i2, _, _ in difflib.SequenceMatcher(a=old_lines, b=new_lines).get_opcodes() if op != "equal"]
    assert changed and all(card.line <= first and last <= card.end_line for first, last in changed)  # nothing else moved


def test_yaml_edits_add_delete_and_quote_an_id_that_would_break_the_yaml():
    edited = apply_yaml(SMALL_CONSTITUTION, [CardEdit(index=1, delete=True),
                                             CardEdit(id="kind", comparison="Which is kinder?", critique="Find unkindness.",
                                                      revision="Be kinder.", weight=1.0),
                                             CardEdit(index=0, id="a: b")])
    assert "# the first principle: harm" in edited and "# This comment block must survive" in edited
    assert "comparison: Which response is less harmful?   # asked per pair" in edited
    cards = yaml_cards(edited)
    assert [c.fields["id"] for c in cards] == ["a: b", "kind"]  # quoted, so still YAML; the lint says the id is bad
    assert "weight" not in edited.split("id: kind")[1]  # the default stays unwritten


def test_plain_text_edits_rewrite_the_paragraph_in_place():
    text = "# Kind assistant\nChoose the kinder response.\n\n- Choose the more honest response.\n- [brief] Choose the shorter one.\n"
    edited = apply_text(text, [CardEdit(index=0, comparison="Choose the response\nthat is gentler."), CardEdit(index=2, delete=True),
                               CardEdit(id="calm", comparison="Choose the calmer response.")])
    assert edited == ("# Kind assistant\nChoose the response that is gentler.\n\n- Choose the more honest response.\n\n"
                      "[calm] Choose the calmer response.\n")
    c = parse_text_constitution(edited)
    assert [p.id for p in c.principles] == ["p1", "p2", "calm"]
    assert [card.fields["id"] for card in text_cards(edited)] == ["p1", "p2", "calm"]


def test_flipped_pairs_are_those_whose_agreement_changed():
    before = [{"agree": 1.0, "p_chosen": 0.7}, {"agree": 0.0, "p_chosen": 0.4}, {"agree": 1.0, "p_chosen": 0.6}]
    after = [{"agree": 1.0, "p_chosen": 0.8}, {"agree": 1.0, "p_chosen": 0.55}, {"agree": 0.5, "p_chosen": 0.5}]
    flipped = flipped_pairs(PAIRS, before, after)
    assert [f["pair"] for f in flipped] == [1, 2]
    assert flipped[0]["prompt"] == PAIRS[1]["prompt"] and (flipped[0]["judge_before"], flipped[0]["judge_after"]) == (0.4, 0.55)


def test_the_studio_refuses_to_bind_beyond_loopback_without_a_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(SMALL_CONSTITUTION, encoding="utf-8")
    from cai.cli import app

    result = CliRunner().invoke(app, ["studio", str(path), "--host", "0.0.0.0", "--judge-url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "refusing to bind 0.0.0.0" in result.output
    assert path.read_text(encoding="utf-8") == SMALL_CONSTITUTION
    result = CliRunner().invoke(app, ["studio", "harmless-helpful", "--judge-url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "harmless-helpful: no such file; the studio edits a constitution file" in result.output


def _offline_app(path, tmp_path, **settings):
    """The studio app on `path` with a judge client that is never asked (nothing here reaches a judge)."""
    from cai.judge_cache import JudgeCache
    from cai.judge_client import JudgeClient
    from cai.studio.app import build_app
    from cai.studio.judging import PeopleBench, StudioJudge
    from cai.studio.settings import StudioSettings
    from cai.studio.state import ConstitutionFile

    config = StudioSettings(constitution=path, judge_url="http://127.0.0.1:9", **settings)
    config.check_bind()
    judge = StudioJudge(JudgeClient("http://127.0.0.1:9"), JudgeCache(tmp_path / "cache.sqlite"), "m", 8)
    return build_app(config, judge, ConstitutionFile(path), PeopleBench(PAIRS, [True] * len(PAIRS), 0))


def test_beyond_loopback_the_page_needs_its_key_then_holds_it_in_a_cookie(tmp_path):
    """The key is checked before any route runs."""
    path = tmp_path / "c.yaml"
    path.write_text(SMALL_CONSTITUTION, encoding="utf-8")
    app = _offline_app(path, tmp_path, host="0.0.0.0", api_key="k-123")  # a key given: binding beyond loopback is allowed

    async def visit() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://studio.lan:8765") as client:
            codes = [(await client.get("/api/version")).status_code, (await client.get("/?key=wrong")).status_code]
            opened = await client.get("/?key=k-123")
            codes += [opened.status_code, (await client.get("/api/version")).status_code]
        async with httpx.AsyncClient(transport=transport, base_url="http://studio.lan:8765") as fresh:  # no cookie: the header
            return codes + [(await fresh.get("/api/version", headers={"Authorization": "Bearer k-123"})).status_code]

    assert asyncio.run(visit()) == [401, 401, 303, 200, 200]


def test_a_plain_text_constitution_is_edited_paragraph_by_paragraph_through_the_api(tmp_path):
    path = tmp_path / "mine.md"
    path.write_text("# Kind assistant\nChoose the kinder response.\n\n[honest] Choose the more honest response.\n", encoding="utf-8")
    app = _offline_app(path, tmp_path)

    async def edit() -> tuple[dict, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8765") as client:
            client.headers["X-Studio-Token"] = app.state.token
            view = (await client.get("/api/constitution")).json()
            saved = await client.put("/api/constitution", json={"base": view["file_hash"], "edits": [
                {"index": 1, "comparison": "Choose the response that is honest about what it does not know."}]})
            refused = await client.put("/api/constitution", json={"base": saved.json()["file_hash"], "edits": [
                {"index": 0, "critique": "Find unkindness."}]})
            return view, saved, refused

    view, saved, refused = asyncio.run(edit())
    assert view["format"] == "text" and [(c["id"], c["line"]) for c in view["cards"]] == [("p1", 2), ("honest", 4)]
    assert view["cards"][0]["critique"].endswith("Choose the kinder response.")  # from the template
    assert saved.status_code == 200, saved.text
    assert path.read_text(encoding="utf-8") == ("# Kind assistant\nChoose the kinder response.\n\n"
                                                "[honest] Choose the response that is honest about what it does not know.\n")
    assert refused.status_code == 422 and "convert it to YAML" in refused.json()["error"]["message"]


# -- the app against the real judge -------------------------------------------------------------------


@pytest.fixture(scope="module")
def studio(judge, judge_constitution, tmp_path_factory):
    """An HTTP client of the studio on the file the session's judge serves, holding the page's token."""
    with running_studio(judge.url, judge_constitution, tmp_path_factory.mktemp("studio"), max_body_bytes=200_000) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        client.headers["X-Studio-Token"] = page_token(client)
        yield client, judge_constitution


def _reset(client: httpx.Client, path) -> dict:
    path.write_text(SMALL_CONSTITUTION, encoding="utf-8")
    return client.get("/api/constitution").json()


def test_a_save_writes_the_file_atomically_with_its_comments(studio):
    client, path = studio
    view = _reset(client, path)
    assert [c["id"] for c in view["cards"]] == ["harmless", "helpful"] and view["cards"][1]["weight"] == 2.0
    inode = path.stat().st_ino
    r = client.put("/api/constitution", json={"base": view["file_hash"], "edits": [{"index": 0, "comparison": "Which is safer?"}]})
    assert r.status_code == 200, r.text
    text = path.read_text(encoding="utf-8")
    changed = [(a, b) for a, b in zip(SMALL_CONSTITUTION.splitlines(), text.splitlines()) if a != b]
    assert len(text.splitlines()) == len(SMALL_CONSTITUTION.splitlines()) and len(changed) == 1
    assert re.fullmatch(r" +comparison: Which is safer\? +# asked per pair", changed[0][1])  # its comment kept, at its column
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left, nothing else written
    assert r.json()["file_hash"] != view["file_hash"] and r.json()["in_service"]["hash"] != view["in_service"]["hash"]


def test_a_save_from_an_older_version_is_refused_with_both_versions(studio):
    client, path = studio
    view = _reset(client, path)
    path.write_text(SMALL_CONSTITUTION.replace("more helpful", "most useful"), encoding="utf-8")  # edited in the user's editor
    assert client.get("/api/version").json()["file_hash"] != view["file_hash"]
    r = client.put("/api/constitution", json={"base": view["file_hash"], "edits": [{"index": 0, "comparison": "Which is safer?"}]})
    assert r.status_code == 409
    body = r.json()
    assert body["theirs"]["text"] == path.read_text(encoding="utf-8") and "most useful" in body["theirs"]["text"]
    assert "Which is safer?" in body["mine"] and "more helpful" in body["mine"]
    assert "Which is safer?" not in path.read_text(encoding="utf-8")  # nothing overwritten
    r = client.put("/api/constitution", json={"base": body["theirs"]["file_hash"], "edits": [{"index": 0, "comparison": "Which is safer?"}]})
    assert r.status_code == 200 and "most useful" in path.read_text(encoding="utf-8")  # saved over it, on purpose


@pytest.mark.parametrize("edit, field, message", [
    ({"index": 1, "id": "harmless"}, "principles[1].id", "duplicate principle id 'harmless'"),
    ({"index": 0, "critique": "  "}, "principles[0].critique", "must not be empty"),
    ({"index": 1, "id": "a: b"}, "principles[1].id", "should match pattern"),
])
def test_a_broken_edit_is_not_saved_and_its_problem_is_on_its_card(studio, edit, field, message):
    client, path = studio
    view = _reset(client, path)
    r = client.put("/api/constitution", json={"base": view["file_hash"], "edits": [edit]})
    assert r.status_code == 422
    card = r.json()["draft"]["cards"][edit["index"]]
    assert [p["field"] for p in card["problems"]] == [field] and message in card["problems"][0]["message"]
    assert card["problems"][0]["line"] == card["line"] + (0 if field.endswith(".id") else 1)
    assert path.read_text(encoding="utf-8") == SMALL_CONSTITUTION


def test_a_broken_file_on_disk_shows_per_card_and_the_last_good_version_stays_in_service(studio):
    client, path = studio
    good = _reset(client, path)["in_service"]["hash"]
    path.write_text(SMALL_CONSTITUTION.replace("    revision: Rewrite the response to be more helpful.\n", ""), encoding="utf-8")
    view = client.get("/api/constitution").json()
    assert not view["valid"] and view["in_service"]["hash"] == good
    assert [p["field"] for p in view["cards"][1]["problems"]] == ["principles[1].revision"] and not view["cards"][0]["problems"]
    r = client.post("/api/try", json={"prompt": "Hi", "answers": ["Hello!", "Go away."], "principle_id": "helpful"})
    assert r.status_code == 200 and r.json()["constitution_hash"] == good  # the judge answers for the last good version
    path.write_text("principles: [unclosed\n", encoding="utf-8")
    view = client.get("/api/constitution").json()
    assert view["cards"] == [] and "YAML syntax error" in view["problems"][0]["message"] and view["in_service"]["hash"] == good


def test_try_it_gives_critique_revision_and_both_order_labels_per_principle(studio):
    client, path = studio
    _reset(client, path)
    r = client.post("/api/try", json={"prompt": "How do I bake bread?", "answers": ["Mix flour, water, yeast; bake.", "No."],
                                      "principle_id": "helpful"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["answers"]) == 2 and all(isinstance(a["critique"], str) and isinstance(a["revision"], str) for a in out["answers"])
    assert [label["principle_id"] for label in out["labels"]] == ["harmless", "helpful"]
    for label in out["labels"]:
        assert 0 <= label["p_a_shown_first"] <= 1 and 0 <= label["p_a_shown_second"] <= 1 and 0 < label["option_mass"] <= 1
        assert label["p_a"] == pytest.approx((label["p_a_shown_first"] + label["p_a_shown_second"]) / 2, abs=1e-6)
        assert label["same_position"] == ((label["p_a_shown_first"] > 0.5) != (label["p_a_shown_second"] > 0.5))


def _measure(client: httpx.Client) -> dict:
    assert client.post("/api/people/run").status_code == 200
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        report = client.get("/api/people").json()
        if report["progress"]["state"] in ("done", "error"):
            assert report["progress"]["state"] == "done", report["progress"]["error"]
            return report
        time.sleep(0.3)
    raise AssertionError("the against-people run did not finish in 300 s")


def test_against_people_reasks_only_the_edited_principle_and_lists_flips(studio):
    client, path = studio
    view = _reset(client, path)
    first = _measure(client)
    n = len(PAIRS)
    assert (first["progress"]["total"], first["progress"]["misses"] + first["progress"]["hits"]) == (2 * n, 2 * n)
    figures = first["current"]["figures"]
    assert figures["n_pairs"] == n and set(figures["per_principle"]) == {"harmless", "helpful"}
    assert figures["agreement"]["low"] - 1e-9 <= figures["agreement"]["value"] <= figures["agreement"]["high"] + 1e-9
    r = client.put("/api/constitution", json={"base": view["file_hash"], "edits": [
        {"index": 1, "comparison": "Which response answers the question the user actually asked, fully and correctly?"}]})
    assert r.status_code == 200
    second = _measure(client)
    assert (second["progress"]["hits"], second["progress"]["misses"]) == (n, n)  # only the edited principle asked again
    change = second["change"]
    assert change["from"] == first["current"]["hash"] and change["to"] == second["current"]["hash"]
    assert change["agreement_change"]["n"] == n and change["agreement_change"]["low"] <= change["agreement_change"]["high"]
    versions = client.get("/api/versions").json()["versions"]
    assert [v["measured"] for v in versions if v["hash"] in (change["from"], change["to"])] == [True, True]
    # Going back restores the first text through the conflict check; its figures come from the cache.
    current = client.get("/api/constitution").json()
    assert client.post("/api/restore", json={"base": view["file_hash"], "hash": change["from"]}).status_code == 409
    r = client.post("/api/restore", json={"base": current["file_hash"], "hash": change["from"]})
    assert r.status_code == 200 and "Which response is more helpful?" in path.read_text(encoding="utf-8")
    third = _measure(client)
    assert third["current"]["hash"] == change["from"] and third["progress"]["total"] == 0  # measured before: nothing asked
    compared = client.get("/api/compare", params={"a": change["from"], "b": change["to"]}).json()
    assert compared["agreement_change"] == change["agreement_change"] and compared["flipped"] == change["flipped"]
    assert second["current"]["figures"]["agreement"]["value"] - figures["agreement"]["value"] == \
        pytest.approx(change["agreement_change"]["value"])
    for flip in change["flipped"]:
        pair = PAIRS[flip["pair"]]
        assert (flip["prompt"], flip["chosen"], flip["rejected"]) == (pair["prompt"], pair["chosen"], pair["rejected"])
        assert flip["agree_before"] != flip["agree_after"]


def test_state_changes_need_the_page_token_and_bodies_are_bounded(studio):
    client, path = studio
    view = _reset(client, path)
    edit = {"base": view["file_hash"], "edits": [{"index": 0, "comparison": "Which is safer?"}]}
    assert client.put("/api/constitution", json=edit, headers={"X-Studio-Token": "wrong"}).status_code == 403
    r = client.put("/api/constitution", json={**edit, "path": "/tmp/elsewhere.yaml"})
    assert r.status_code == 422 and "path" in r.json()["error"]["message"]  # no request names a file
    huge = {"base": view["file_hash"], "edits": [{"index": 0, "comparison": "x" * 300_000}]}
    r = client.put("/api/constitution", json=huge)
    assert r.status_code == 413 and "limit of 200,000 bytes" in r.json()["error"]["message"]
    r = client.put("/api/constitution", content=b'{"base": "\xff"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]["message"]
    assert client.get("/api/version", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
    assert path.read_text(encoding="utf-8") == SMALL_CONSTITUTION  # nothing above wrote
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# -- the data it would make ---------------------------------------------------------------------------


def _preview(client: httpx.Client, body: dict) -> dict:
    r = client.post("/api/preview/run", json=body)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        report = client.get("/api/preview").json()
        if report["state"] in ("done", "error"):
            return report
        time.sleep(0.3)
    raise AssertionError("the data preview did not finish in 300 s")


def test_the_data_preview_shows_the_rows_cai_generate_sft_writes(judge, judge_constitution, tiny_model_dir, tmp_path):
    """The same prompts, seed and constitution through the generator itself: the same rows, the same ones written."""
    import json

    from cai.generate.sft import SftJob, generate_sft
    from cai.samples import SamplingConfig

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [
        "How do I pick a lock?", "What is the capital of France?", "Write a haiku about rain.", "How can I cheat on a test?",
        "Tell me how to hurt someone.", "Explain photosynthesis."]), encoding="utf-8")
    (tmp_path / "studio").mkdir()
    with running_studio(judge.url, judge_constitution, tmp_path / "studio", preview_prompts=str(src)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        client.headers["X-Studio-Token"] = page_token(client)
        report = _preview(client, {"count": 3, "seed": 1, "rounds": 2})
        assert report["state"] == "done", report["error"]
        job = SftJob(prompts=str(src), out=tmp_path / "sft", limit=3, seed=1, rounds=2, policy=str(tiny_model_dir),
                     policy_backend="transformers", constitution=str(judge_constitution), judge_url=judge.url,
                     sampling=SamplingConfig(max_new_tokens=12), critique_tokens=12, revision_tokens=12,
                     judge_cache=tmp_path / "sft-cache.sqlite")  # its own cache: every answer asked of the judge again
        summary = generate_sft(job)
    logged = [json.loads(line) for line in (job.out / "progress.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and [s["row"] for s in report["rows"]] == logged  # every field, provenance included
    written = [json.loads(line)["id"] for line in (job.out / "sft.jsonl").read_text().splitlines()]
    assert [s["row"]["id"] for s in report["rows"] if s["written"]] == written and summary["rows"] == len(written)
    assert f"--prompts {src} --limit 3 --seed 1 --rounds 2" in report["command"] and report["done"] == report["total"] == 3 + 12
    for shown in report["rows"]:
        assert shown["answer_from"] == "policy" and shown["row"]["status"] == "ok"
        assert [s["round"] for s in shown["steps"]] == [0, 1]
        for step in shown["steps"]:  # the guard's verdict on every revision, with its reason when it rejects one
            assert step["verdict"] == ("kept" if step["rejected"] is None else f"rejected: {step['rejected']}")
        assert shown["outcome"].startswith("written to sft.jsonl" if shown["written"] else "dropped from sft.jsonl")


def test_the_data_preview_takes_pasted_answers_and_a_judge_failure_fails_only_its_row(studio):
    client, path = studio
    _reset(client, path)
    assert client.post("/api/preview/run", json={"prompts": ["Hi"], "answers": ["a", "b"]}).status_code == 422
    report = _preview(client, {"prompts": ["How do I bake bread?", "Summarise this.", "Tell me a joke."],
                               "answers": ["Mix flour, water and yeast, then bake it.", "word " * 1500], "rounds": 1})
    assert report["state"] == "done", report["error"]
    bread, long, joke = report["rows"]
    assert [r["answer_from"] for r in report["rows"]] == ["pasted", "pasted", "policy"]
    assert bread["row"]["initial_response"] == "Mix flour, water and yeast, then bake it."
    assert bread["row"]["id"].startswith("studio:") and len(bread["steps"]) == 1 and bread["steps"][0]["verdict"]
    assert long["row"]["status"] == "judge_failed" and "critique in round 0" in long["row"]["error"] and not long["written"]
    assert long["outcome"].startswith("dropped: the judge failed") and report["command"] is None  # typed prompts: no command
    assert joke["row"]["status"] == "ok" and joke["row"]["initial_finish_reason"] in ("stop", "length")
