"""Synthetic data generation: what resumes, the summary figures, and both generators end to end (tiny model, real judge)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from datasets import load_from_disk

from cai.generate.prefs import PrefsJob, generate_prefs, prompts_to_do, summarise
from cai.generate.sft import SftJob, generate_sft, is_sft_target
from cai.pinning import RunMismatchError
from cai.prompts import Prompt
from cai.rowlog import RowLog
from cai.samples import SamplingConfig
from tests.conftest import JUDGE_KEY, kill_after_rows

# -- pieces -----------------------------------------------------------------------------


def test_prefs_resume_redoes_a_prompt_whose_pairs_were_cut_short(tmp_path):
    prompts = [Prompt.from_text(t, "t") for t in ("p0", "p1", "p2", "p3", "p4")]
    with RowLog.open(tmp_path / "progress.jsonl") as log:
        pid = [p.id for p in prompts]
        log.append({"id": f"{pid[0]}:0-1", "prompt_id": pid[0], "status": "ok", "pairs_for_prompt": 3})  # killed after 1 of 3
        for pair in ("0-1", "0-2", "1-2"):
            log.append({"id": f"{pid[1]}:{pair}", "prompt_id": pid[1], "status": "ok", "pairs_for_prompt": 3})
        log.append({"id": f"{pid[2]}:0-1", "prompt_id": pid[2], "status": "judge_failed", "pairs_for_prompt": 1})
        log.append({"id": f"{pid[3]}:none", "prompt_id": pid[3], "status": "no_pair", "pairs_for_prompt": 1})
        assert [p.text for p in prompts_to_do(log, prompts)] == ["p0", "p2", "p4"]


def test_revision_pairs_prefer_the_final_revision_and_skip_rows_that_state_no_preference():
    from cai.generate.revision_pairs import revision_pairs
    from judge_server.protocol import EMPTY_RESPONSE

    def row(i, first, final, status="ok"):
        return {"id": f"p{i}", "prompt": f"q{i}", "initial_response": first, "final_response": final, "status": status,
                "trajectory": [{"principle_id": "harm"}, {"principle_id": "honesty"}], "provenance": {"constitution_hash": "h"}}

    pairs = revision_pairs([row(0, "Sure, here is how.", "I can't help with that."), row(1, "Same.", " Same."),
                            row(2, "", "A revision of nothing."), row(3, "x", "y", status="judge_failed"), row(4, "z", "")])
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p0", "I can't help with that.", "Sure, here is how."), ("p2", "A revision of nothing.", EMPTY_RESPONSE)]
    assert pairs[0]["p_chosen"] == 1.0 and pairs[0]["provenance"] == {
        "constitution_hash": "h", "source": "revision", "rounds": 2, "principle_ids": ["harm", "honesty"]}


def test_a_revision_that_copies_the_few_shot_example_or_the_critique_is_rejected():
    """What SmolLM2-135M did as the judge under `concise`: 22 of 24 revisions copied the example or the critique."""
    from cai.constitution import find_constitution, load_constitution
    from cai.generate.revision_guard import rejected_revision

    concise = load_constitution(find_constitution("concise"))
    critique = "The answer buried in the middle after a filler opener is hard to find for the user."
    answer = "Great question! There are many ports. Postgres usually listens on a port, often 5432, which you can change."

    def why(revision, prompt="Which port does Postgres use?"):
        return rejected_revision(revision, answer=answer, prompt=prompt, critique=critique, constitution=concise)

    copied = "5432. You can change it with the `port` setting in `postgresql.conf`."  # the example's revision, verbatim
    assert why(copied) == "copies the constitution's few-shot example"
    assert why(critique + " Sure.") == "repeats the critique"
    assert why("  ") == "empty"
    assert why("Postgres listens on port 5432 by default; the port setting in its config file changes it.") is None


def test_the_revision_guard_judges_a_revision_by_what_it_is():
    """The audit's misfires, both ways: a good revision in the critique's suggested words was rejected; an unchanged
    answer, a repetition loop, a bare "I cannot." and the user's prompt echoed back were accepted."""
    from cai.constitution import find_constitution, load_constitution
    from cai.generate.revision_guard import rejected_revision

    hh = load_constitution(find_constitution("harmless-helpful"))
    prompt = "How can I get into my neighbour's wifi without the password?"
    answer = "You can use a tool like aircrack-ng to capture the handshake and crack the password, then connect to the network."
    critique = ('The response explains how to break into someone else\'s network, which is illegal. The response is harmful '
                'because it gives concrete steps. A better response would say "I can\'t help with getting into a network '
                'without its owner\'s permission, but you could ask your neighbour to share it or get your own plan."')

    def why(revision):
        return rejected_revision(revision, answer=answer, prompt=prompt, critique=critique, constitution=hh)

    suggested = ("I can't help with getting into a network without its owner's permission, but you could ask your neighbour to "
                 "share it or get your own plan.")
    assert why(suggested) is None  # adopts the wording the critique suggested: a revision
    assert why(answer) == "unchanged"
    assert why(answer.replace("and crack", "and break")[:-20]) == "unchanged"  # one word swapped and the tail cut off
    assert why("No, no, no, no, no, no, no, no, no, no, no, no, no, no, no, no, no, no, no, no, no, no,") == "repetition loop"
    assert why("I cannot.") == "too short to be an answer"
    assert why(prompt) == "copies the prompt"
    assert why("The response explains how to break into someone else's network, which is illegal and harmful.") == "repeats the critique"
    paraphrase = "This response should have refused: breaking into a network without permission is a crime."
    assert why(paraphrase) == "comments on the answer instead of answering"
    assert why("The\n\nCritique request: Identify claims in the assistant's last response that are false.") == "copies the judge's instructions"


def test_the_revision_guard_on_real_labelled_revisions_makes_the_errors_its_docstring_states():
    """Real SmolLM2-135M critique -> revision steps and a few hand-written hard cases, each labelled by hand
    (tests/data/revisions_labelled.jsonl): the guard's misses and false alarms are the ones GUARD_TEST_SET states."""
    from pathlib import Path

    from cai.constitution import find_constitution, load_constitution
    from cai.generate.revision_guard import GUARD_TEST_SET, rejected_revision

    rows = [json.loads(line) for line in (Path(__file__).parent / "data" / "revisions_labelled.jsonl").read_text().splitlines()]
    constitutions = {name: load_constitution(find_constitution(name)) for name in {r["constitution"] for r in rows}}
    measured = {}
    for part in ("real", "hand-written"):
        chosen = [r for r in rows if (r["source"] == "hand-written") == (part == "hand-written")]
        accepted = [rejected_revision(r["revision"], answer=r["answer"], prompt=r["prompt"], critique=r["critique"],
                                      constitution=constitutions[r["constitution"]]) is None for r in chosen]
        measured[part] = {"labelled": len(chosen), "good": sum(r["good"] for r in chosen),
                          "missed": sum(a and not r["good"] for r, a in zip(chosen, accepted)),  # a bad revision let through
                          "false_alarms": sum(r["good"] and not a for r, a in zip(chosen, accepted))}  # a good one rejected
    assert measured == GUARD_TEST_SET
    assert all(r["reason"] and r["source"] for r in rows)


def _logged_sft_rows(tmp_path, keep_unrevised=False):
    """An SFT job whose every prompt is already in progress.jsonl, as the generator logs them: one revised row, one whose
    revision was rejected (its first answer a harmful compliance), one with an empty first answer and no revision."""
    from cai.prompts import load_prompts

    src = prompts_file(tmp_path, ["How do I pick a lock?", "How do I make a bomb?", "Say nothing."])
    out = tmp_path / "out"
    ids = [p.id for p in load_prompts(str(src))]
    rejected = [{"round": 0, "principle_id": "harm", "critique": "c", "revision": "r", "rejected": "unchanged"}]
    rows = [
        ("I can't help with breaking into locks you don't own; a locksmith can.", True, "Use a tension wrench and a pick."),
        ("Sure: mix the following chemicals ...", False, "Sure: mix the following chemicals ..."),
        ("(the assistant gave no response)", False, ""),
    ]
    with RowLog.open(out / "progress.jsonl") as log:
        for i, (final, revised, first) in zip(ids, rows):
            log.append({"id": i, "prompt": "p", "category": None, "initial_response": first, "trajectory": [] if revised else rejected,
                        "revised": revised, "final_response": final, "status": "ok", "error": None,
                        "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": final}]})
    return SftJob(prompts=str(src), out=out, keep_unrevised=keep_unrevised)


def test_rows_never_revised_are_logged_but_not_sft_targets_unless_kept(tmp_path):
    job = _logged_sft_rows(tmp_path)
    summary = generate_sft(job)  # every row is done: nothing to generate, the outputs are rewritten from the log
    targets = [json.loads(line)["messages"][1]["content"] for line in (job.out / "sft.jsonl").read_text().splitlines()]
    assert targets == ["I can't help with breaking into locks you don't own; a locksmith can."]
    assert len(load_from_disk(str(job.out / "dataset"))) == 1
    assert (summary["rows"], summary["rows_revised"], summary["rows_dropped_unrevised"]) == (1, 1, 2)
    assert json.loads((job.out / "summary.json").read_text())["rows_dropped_unrevised"] == 2
    assert len((job.out / "progress.jsonl").read_text().splitlines()) == 3  # the log keeps every row, and a rerun adds none
    done = subprocess.run([sys.executable, "-m", "cai.cli", "generate", "sft", "--prompts", job.prompts, "--out", str(job.out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})  # no wrapped log lines
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"rows_dropped_unrevised": 2' in done.stdout and "2 of 3 finished rows were never revised" in done.stderr
    assert len((job.out / "progress.jsonl").read_text().splitlines()) == 3

    # Kept on request (a resumed run may change this: it selects from the log, it changes no row); the empty answer's
    # placeholder is never a target.
    kept = generate_sft(SftJob(**{**job.__dict__, "keep_unrevised": True}))
    targets = [json.loads(line)["messages"][1]["content"] for line in (job.out / "sft.jsonl").read_text().splitlines()]
    assert targets == ["I can't help with breaking into locks you don't own; a locksmith can.", "Sure: mix the following chemicals ..."]
    assert (kept["rows"], kept["rows_dropped_unrevised"]) == (2, 1)


def test_when_no_row_was_revised_the_outputs_hold_no_rows_not_an_older_dataset(tmp_path):
    job = _logged_sft_rows(tmp_path, keep_unrevised=True)
    generate_sft(job)
    assert len(load_from_disk(str(job.out / "dataset"))) == 2
    with RowLog.open(job.out / "progress.jsonl") as log:  # the one revised row, logged again as not revised
        first = log.final_rows()[0]
        log.append({**first, "revised": False, "final_response": first["initial_response"]})
    summary = generate_sft(SftJob(**{**job.__dict__, "keep_unrevised": False}))
    assert summary["rows"] == 0 and summary["rows_dropped_unrevised"] == 3
    assert (job.out / "sft.jsonl").read_text() == "" and not (job.out / "dataset").exists()


def test_summary_figures_by_hand():
    ok = [
        {"status": "ok", "chosen": "long answer", "rejected": "short", "p_chosen": 0.5, "same_position": True, "option_mass": 0.2},
        {"status": "ok", "chosen": "a", "rejected": "bbb", "p_chosen": 1.0, "same_position": False, "option_mass": 0.4},
    ]
    s = summarise(ok + [{"status": "judge_failed"}])
    assert s["pairs"] == 2 and s["status"] == {"ok": 2, "judge_failed": 1}
    assert s["label_entropy_bits"] == 0.5  # H(0.5)=1 bit, H(1.0)=0
    assert s["position_consistency_rate"] == 0.5 and s["longer_is_chosen_rate"] == 0.5
    assert s["mean_chars_chosen"] == 6.0 and s["mean_chars_rejected"] == 4.0


def _varied_rows(n):
    """Rows as heterogeneous as a log's: a column None in the first thousand rows and a string later, ints then floats,
    empty lists then strings, structs whose keys and types grow, a column None in every row, non-ASCII text."""
    return [{"id": f"r{i}", "status": "ok", "late": None if i < 1000 else f"s{i}", "score": i if i < 1500 else i + 0.5,
             "principle_ids": [] if i < 1200 else ["harm"] * (i % 3),
             "provenance": {"seed": 0} if i < 1100 else {"seed": 1, "sampling": {"top_p": None if i < 2000 else 0.9}},
             "error": None, "option": {"k": i} if i % 7 == 0 else None, "text": f"réponse {i} \u2028 ✓"} for i in range(n)]


def test_the_dataset_folder_has_from_lists_schema_and_rows_though_written_a_batch_at_a_time(tmp_path):
    """`write_rows` infers each column's type a batch (1,000 rows) at a time; the folder must be what
    `Dataset.from_list(rows).save_to_disk` wrote when every row was held: the same features, rows and dataset_info.json."""
    from datasets import Dataset

    from cai.generate.outputs import write_rows

    rows = _varied_rows(2500)
    assert write_rows(iter(rows), tmp_path / "rows.jsonl", tmp_path / "dataset") == 2500
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "before"))
    new, before = load_from_disk(str(tmp_path / "dataset")), load_from_disk(str(tmp_path / "before"))
    assert new.features == before.features and str(new.features["late"]) == "Value('string')"
    assert str(new.features["provenance"]) == "{'seed': Value('int64'), 'sampling': {'top_p': Value('float64')}}"
    assert new.to_list() == before.to_list()
    assert (tmp_path / "dataset" / "dataset_info.json").read_text() == (tmp_path / "before" / "dataset_info.json").read_text()
    assert sorted(os.listdir(tmp_path / "dataset")) == sorted(os.listdir(tmp_path / "before"))

    # A rerun with no rows removes the folder; one whose column holds a string and a number says which column.
    assert write_rows([], tmp_path / "rows.jsonl", tmp_path / "dataset") == 0 and not (tmp_path / "dataset").exists()
    from cai.generate.outputs import RowTypeError

    with pytest.raises(RowTypeError, match=r"rows.jsonl: rows 1001-1001 have a column of another type .*late"):
        write_rows(rows[1000:2000] + [{**rows[0], "late": 3}], tmp_path / "rows.jsonl", tmp_path / "dataset")
    with pytest.raises(RowTypeError, match=r"rows.jsonl: column 'late' holds values of more than one type"):
        write_rows([{"late": "a"}, {"late": 3}], tmp_path / "rows.jsonl", tmp_path / "dataset")


def test_a_key_missing_from_the_first_row_is_a_column_where_from_list_dropped_it(tmp_path):
    """Deliberately not as before: `Dataset.from_list` takes its columns from the first row, so a key first seen later
    was in the JSONL but not the dataset; now every key is a column, None in the rows that lack it."""
    from datasets import Dataset

    from cai.generate.outputs import write_rows

    rows = [{"id": "a", "status": "ok"}] + [{"id": f"b{i}", "status": "ok", "revised": i % 2 == 0} for i in range(1500)]
    write_rows(rows, tmp_path / "rows.jsonl", tmp_path / "dataset")
    before = Dataset.from_list(rows)
    assert before.column_names == ["id", "status"]
    new = load_from_disk(str(tmp_path / "dataset"))
    assert new.column_names == ["id", "status", "revised"] and str(new.features["revised"]) == "Value('bool')"
    assert new.to_list() == [{"revised": None, **r} for r in rows]


def _log_rows(path, rows):
    with RowLog.open(path) as log:
        for row in rows:
            log.append(row)
    with open(path, "a") as f:
        f.write('{"id": "killed", "sta')  # a killed run's partial last line: no row
    last: dict = {}
    for row in rows:
        last[row["id"]] = row
    return list(last.values())


def test_prefs_outputs_read_from_the_log_are_those_of_its_rows_held_whole(tmp_path):
    """`write_prefs` over a log reads it a row at a time; its outputs are what it wrote from the list of the log's last rows."""
    from datasets import Dataset

    from cai.generate.prefs import write_prefs

    def row(i, status="ok"):
        base = {"id": f"p{i % 2600}:0-1", "prompt_id": f"p{i % 2600}", "prompt": f"q{i}", "category": None, "pairs_for_prompt": 1,
                "provenance": {"seed": 0, "sampling": {"temperature": 1.0}}, "status": status}
        if status != "ok":
            return {**base, "error": "judge: timeout", "chosen": None, "rejected": None}
        return {**base, "error": None, "chosen": "c" * (i % 50), "rejected": "r" * (i % 37), "p_chosen": 0.5 + (i % 10) / 20,
                "p_chosen_shown_first": 0.6, "p_chosen_shown_second": 0.4 + (i % 10) / 10, "same_position": i % 3 == 0,
                "principle_ids": ["harm"], "option_mass": 0.9 + (i % 7) / 100}

    # failed rows in the first thousand, retried later (the retry keeps the id's first place); a no_pair row
    rows = [row(i, "judge_failed" if i % 9 == 0 else "ok") for i in range(2600)] + [row(i) for i in range(0, 1200, 9)]
    rows.append({"id": "p9999:none", "prompt_id": "p9999", "prompt": "q", "status": "no_pair", "error": "identical",
                 "pairs_for_prompt": 1})
    final = _log_rows(tmp_path / "progress.jsonl", rows)
    ok = [r for r in final if r["status"] == "ok"]
    job = PrefsJob(prompts="p", out=tmp_path / "out")
    summary = write_prefs(job, RowLog.read(tmp_path / "progress.jsonl"), {})
    assert (job.out / "prefs.jsonl").read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ok)
    ds, before = load_from_disk(str(job.out / "dataset")), Dataset.from_list(ok)
    assert ds.features == before.features and ds.to_list() == before.to_list()
    assert summary["rows"] == summary["pairs"] == len(ok) and summary["status"] == {"ok": len(ok), "judge_failed": 155, "no_pair": 1}
    assert summary["mean_p_chosen"] == round(sum(r["p_chosen"] for r in ok) / len(ok), 4)
    assert summary["mean_chars_rejected"] == round(sum(len(r["rejected"]) for r in ok) / len(ok), 1)
    assert summary == summarise(final) | {"rows": len(ok), "output": str(job.out / "prefs.jsonl")}


def test_sft_outputs_read_from_the_log_are_those_of_its_rows_held_whole(tmp_path):
    from datasets import Dataset

    from cai.generate.revision_pairs import revision_pairs
    from cai.generate.sft import write_sft

    def row(i, status="ok"):
        steps = [{"round": 0, "principle_id": "harm", "critique": "c", "revision": f"v{i}", "rejected": [None, "unchanged", "empty"][i % 3]}]
        revised = i % 3 == 0
        return {"id": f"s{i % 1300}", "prompt": f"q{i}", "category": None, "initial_response": "" if i % 5 == 0 else f"a{i}",
                "trajectory": steps, "revised": revised, "final_response": f"v{i}" if revised else f"a{i}", "status": status,
                "error": None if status == "ok" else "critique in round 0: timeout",
                "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"v{i}"}]}

    rows = [row(i, "judge_failed" if i % 11 == 0 else "ok") for i in range(1300)] + [row(i) for i in range(0, 1300, 22)]
    final = _log_rows(tmp_path / "progress.jsonl", rows)
    job = SftJob(prompts="p", out=tmp_path / "out")
    with pytest.raises(TypeError, match="reads the rows twice"):
        write_sft(job, iter(final), {})
    summary = write_sft(job, RowLog.read(tmp_path / "progress.jsonl"), {})
    kept = [r for r in final if r["status"] == "ok" and is_sft_target(r)]
    pairs = revision_pairs(final)
    assert (job.out / "sft.jsonl").read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    assert (job.out / "revision_pairs.jsonl").read_text() == "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    for folder, expected in (("dataset", kept), ("revision-pairs", pairs)):
        ds, before = load_from_disk(str(job.out / folder)), Dataset.from_list(expected)
        assert ds.features == before.features and ds.to_list() == before.to_list(), folder
    steps = [t for r in final for t in r["trajectory"]]
    finished = [r for r in final if r["status"] == "ok"]
    assert summary == {"rows": len(kept), "output": str(job.out / "sft.jsonl"),
                       "revisions_rejected": {"total": sum(bool(t["rejected"]) for t in steps), "of": len(steps),
                                              "empty": sum(t["rejected"] == "empty" for t in steps),
                                              "unchanged": sum(t["rejected"] == "unchanged" for t in steps)},
                       "rows_revised": sum(r["revised"] for r in finished), "rows_dropped_unrevised": len(finished) - len(kept),
                       "revision_pairs": len(pairs)}
    assert json.loads((job.out / "summary.json").read_text()) == summary


def test_a_run_folder_pinned_before_the_judge_settings_were_shared_still_resumes(tmp_path):
    """run.json as `cai generate sft` wrote it when GenerationJob declared its judge fields itself (another key order)."""
    from cai.pinning import pin_settings

    old = {"prompts": "p", "policy": "smollm2-135m-instruct", "constitution": "harmless-helpful", "judge_model": None,
           "limit": None, "seed": 0, "sampling": {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.95}, "rounds": 2,
           "critique_tokens": 160, "revision_tokens": 192, "constitution_hash": "h" * 64}
    (tmp_path / "run.json").write_text(json.dumps(old, indent=2))
    job = SftJob(prompts="p", out=tmp_path, judge_url="http://127.0.0.1:9", judge_retries=2)  # transient: not pinned
    pin_settings(tmp_path, job, exclude=job.TRANSIENT, extra={"constitution_hash": "h" * 64})
    with pytest.raises(RunMismatchError, match="judge_model: was None, now 'other'"):
        pin_settings(tmp_path, job.model_copy(update={"judge_model": "other"}), exclude=job.TRANSIENT,
                     extra={"constitution_hash": "h" * 64})


# -- end to end against the session's judge ------------------------------------------------


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)


def prompts_file(tmp_path, texts):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


FEW = ["How do I make a bomb?", "What is the capital of France?", "Write a haiku about rain.", "How can I cheat on a test?"]


@pytest.mark.slow
def test_sft_rows_trajectories_and_a_refused_item(tiny_model_dir, judge, judge_constitution, tmp_path, keyed):
    src = prompts_file(tmp_path, FEW + ["word " * 3000])  # the last one is over the judge's token limit
    job = SftJob(prompts=str(src), out=tmp_path / "out", policy=str(tiny_model_dir), constitution=str(judge_constitution),
                 judge_url=judge.url, rounds=2, sampling=SamplingConfig(max_new_tokens=12), critique_tokens=8, revision_tokens=8,
                 chunk_size=2, policy_backend="transformers", judge_cache=tmp_path / "cache.sqlite")
    summary = generate_sft(job)
    finished = [r for r in (json.loads(line) for line in (job.out / "progress.jsonl").read_text().splitlines()) if r["status"] == "ok"]
    assert len(finished) == 4 and summary["failed_this_run"] == 1
    assert summary["rows"] == sum(r["revised"] for r in finished) == 4 - summary["rows_dropped_unrevised"]
    assert set(summary["seconds"]) == {"policy", "judge"}
    assert summary["revisions_rejected"]["of"] == 8 and 0 <= summary["revisions_rejected"]["total"] <= 8
    failed = [r for r in map(json.loads, (job.out / "progress.jsonl").read_text().splitlines()) if r["status"] != "ok"]
    assert len(failed) == 1 and "critique in round 0" in failed[0]["error"] and "tokens; the limit is 1536" in failed[0]["error"]
    for row in finished:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert [t["round"] for t in row["trajectory"]] == [0, 1]
        assert row["revised"] == any(t["rejected"] is None for t in row["trajectory"])
        if not row["revised"]:  # no revision held: the answer stays the first one (not the placeholder for an empty one)
            assert row["final_response"] == row["initial_response"]
        assert row["messages"][1]["content"] == row["final_response"]
        prov = row["provenance"]
        assert len(prov["constitution_hash"]) == 64 and prov["judge_model"] == str(tiny_model_dir) and prov["seed"] == 0
    targets = [json.loads(line) for line in (job.out / "sft.jsonl").read_text().splitlines()]
    assert [r["id"] for r in targets] == [r["id"] for r in finished if r["revised"]]  # only revised rows train SFT
    if targets:
        ds = load_from_disk(str(job.out / "dataset"))
        assert len(ds) == len(targets) and {"messages", "trajectory", "provenance", "initial_response"} <= set(ds.column_names)
    # The rows' revision pairs: final revision over first answer, for every row whose revision changed it
    # (the tiny judge often revises to nothing, which changes nothing; the pairs' content is tested by hand too).
    pairs = [json.loads(line) for line in (job.out / "revision_pairs.jsonl").read_text().splitlines()]
    changed = [r for r in finished if r["final_response"].strip() and r["final_response"].strip() != r["initial_response"].strip()]
    assert summary["revision_pairs"] == len(pairs) == len(changed)
    assert (job.out / "revision-pairs").exists() == bool(pairs)
    for pair, row in zip(pairs, changed):
        assert (pair["prompt"], pair["chosen"], pair["p_chosen"], pair["source"]) == (row["prompt"], row["final_response"], 1.0, "revision")
        assert pair["provenance"]["rounds"] == 2 and pair["provenance"]["principle_ids"] == [t["principle_id"] for t in row["trajectory"]]
    # Principle draws are seeded per prompt and round.
    rows = {r["id"]: r for r in finished}
    again = SftJob(**{**job.__dict__, "out": tmp_path / "again", "judge_cache": tmp_path / "cache2.sqlite"})
    generate_sft(again)
    for r in (json.loads(line) for line in (again.out / "progress.jsonl").read_text().splitlines()):
        if r["status"] == "ok":
            assert [t["principle_id"] for t in r["trajectory"]] == [t["principle_id"] for t in rows[r["id"]]["trajectory"]]

    # Rerun of the finished job: nothing new; the refused prompt is retried and fails again, counted.
    summary2 = generate_sft(job)
    assert summary2["rows"] == summary["rows"] and summary2["failed_this_run"] == 1

    with pytest.raises(RunMismatchError, match="rounds: was 2, now 3"):
        generate_sft(SftJob(**{**job.__dict__, "rounds": 3}))


@pytest.mark.slow
def test_prefs_pairs_labels_and_summary(tiny_model_dir, judge, judge_constitution, tmp_path, keyed):
    job = PrefsJob(prompts=str(prompts_file(tmp_path, FEW)), out=tmp_path / "out", policy=str(tiny_model_dir),
                   constitution=str(judge_constitution), judge_url=judge.url, samples=3, n_principles=2,
                   sampling=SamplingConfig(max_new_tokens=12, temperature=1.0), chunk_size=4, judge_cache=tmp_path / "c.sqlite",
                   policy_backend="vllm")  # vLLM's offline engine, n=3 samples per prompt
    summary = generate_prefs(job)
    ds = load_from_disk(str(job.out / "dataset"))
    assert summary["pairs"] == len(ds) > 0 and len(ds) <= 4 * 3
    assert {"prompt", "chosen", "rejected", "p_chosen", "p_chosen_shown_first", "p_chosen_shown_second", "principle_ids"} <= set(ds.column_names)
    for row in ds:
        assert 0.5 <= row["p_chosen"] <= 1.0 and row["chosen"] != row["rejected"]
        assert row["p_chosen"] == pytest.approx((row["p_chosen_shown_first"] + row["p_chosen_shown_second"]) / 2, abs=1e-6)
        assert len(row["principle_ids"]) == 2
    for key in ("label_entropy_bits", "position_consistency_rate", "mean_chars_chosen", "mean_chars_rejected", "status"):
        assert key in summary
    assert json.loads((job.out / "summary.json").read_text())["pairs"] == summary["pairs"]


@pytest.mark.slow
def test_killed_sft_run_resumes_without_loss_or_duplicates(tiny_model_dir, judge, judge_constitution, tmp_path):
    src = prompts_file(tmp_path, [f"Question number {i}: what is {i} plus {i}?" for i in range(8)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cai.cli", "generate", "sft", "--prompts", str(src), "--out", str(out), "--policy", str(tiny_model_dir),
           "--constitution", str(judge_constitution), "--judge-url", judge.url, "--rounds", "1", "--max-new-tokens", "8",
           "--critique-tokens", "24", "--revision-tokens", "24", "--chunk-size", "1", "--policy-backend", "transformers", "--judge-cache", str(tmp_path / "c.sqlite"),
           "--keep-unrevised"]  # the tiny judge revises nothing; keep its rows so sft.jsonl shows what resuming kept
    env = {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY}
    progress = out / "progress.jsonl"
    written_before = kill_after_rows(cmd, env, progress, 2)
    assert 2 <= written_before < 8

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = [json.loads(line) for line in progress.read_text().splitlines()]
    ids = [r["id"] for r in logged]
    assert len(ids) == len(set(ids)) == 8  # every prompt exactly once
    targets = sorted(r["id"] for r in logged if is_sft_target(r, keep_unrevised=True))
    assert targets, "no row had a first answer to keep"
    final = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in final) == targets
