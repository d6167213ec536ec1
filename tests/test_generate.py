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
    s = summarise(ok, ok + [{"status": "judge_failed"}])
    assert s["pairs"] == 2 and s["status"] == {"ok": 2, "judge_failed": 1}
    assert s["label_entropy_bits"] == 0.5  # H(0.5)=1 bit, H(1.0)=0
    assert s["position_consistency_rate"] == 0.5 and s["longer_is_chosen_rate"] == 0.5
    assert s["mean_chars_chosen"] == 6.0 and s["mean_chars_rejected"] == 4.0


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
