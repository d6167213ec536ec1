"""One generation job over several machines: `--shard I/N` shares and `cai generate merge` (tiny model, real judge)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.errors import ConfigError
from cai.generate.common import shard_prompts
from cai.generate.merge import MergeError, merge_shards
from cai.generate.prefs import PrefsJob, generate_prefs
from cai.generate.sft import SftJob, generate_sft
from cai.pinning import RunMismatchError
from cai.prompts import Prompt
from cai.samples import SamplingConfig
from cai.settings_file import load_settings
from tests.conftest import JUDGE_KEY, kill_after_rows


@pytest.mark.parametrize("given, why", [("3/2", "I must be from 1 to N"), ("0/2", "I must be from 1 to N"),
                                        ("1/0", "I must be from 1 to N"), ("a/2", "expected I/N"), ("1-2", "expected I/N"),
                                        ("1/2/3", "expected I/N"), ("-1/2", "expected I/N")])
def test_a_bad_shard_is_refused_naming_the_flag(given, why):
    with pytest.raises(ConfigError, match=f"--shard {given}: {why}"):
        load_settings(None, {"prompts": "p", "out": "o", "shard": given}, schema=SftJob)


def test_shards_are_counted_from_one_and_share_out_every_prompt_once_in_order():
    assert SftJob(prompts="p", out="o", shard=" 02/3").shard == "2/3"
    prompts = [Prompt.from_text(f"p{i}", "t") for i in range(10)]
    for n in (1, 3, 4, 12):
        shares = [shard_prompts(prompts, f"{i}/{n}") for i in range(1, n + 1)]
        assert sorted(p.id for share in shares for p in share) == sorted(p.id for p in prompts)
        for i, share in enumerate(shares):
            assert share == [p for k, p in enumerate(prompts) if k % n == i]  # a pure function of the prompt's place


def _prompts(tmp_path, n):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}: what is {i} plus {i}?"}) + "\n" for i in range(n)))
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sft_shards_merge_into_the_unsharded_run_and_a_killed_shard_reruns_on_its_own(tiny_model_dir, judge, judge_constitution,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    src = _prompts(tmp_path, 8)
    # Chunks of another size unsharded (3) than in the shards (1): a prompt's samples must not depend on the
    # prompts that share its batch. Each run has its own judge cache.
    common = {"prompts": str(src), "policy": str(tiny_model_dir), "constitution": str(judge_constitution), "judge_url": judge.url,
              "rounds": 1, "sampling": SamplingConfig(max_new_tokens=8), "critique_tokens": 16, "revision_tokens": 16,
              "policy_backend": "transformers",
              "keep_unrevised": True}  # the tiny judge revises little: keep every row
    whole = generate_sft(SftJob(**common, out=tmp_path / "whole", chunk_size=3, judge_cache=tmp_path / "c0.sqlite"))
    assert whole["rows"] >= 4
    one = SftJob(**common, out=tmp_path / "s1", shard="1/2", chunk_size=1, judge_cache=tmp_path / "c1.sqlite")
    assert generate_sft(one)["prompts"] == 4

    # Shard 2 through the command line, killed after its first row.
    s2 = tmp_path / "s2"
    cmd = [sys.executable, "-m", "cai.cli", "generate", "sft", "--prompts", str(src), "--out", str(s2), "--shard", "2/2",
           "--policy", str(tiny_model_dir), "--constitution", str(judge_constitution), "--judge-url", judge.url, "--rounds", "1",
           "--max-new-tokens", "8", "--critique-tokens", "16", "--revision-tokens", "16", "--chunk-size", "1",
           "--policy-backend", "transformers", "--judge-cache", str(tmp_path / "c2.sqlite"), "--keep-unrevised"]
    env = {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY}
    progress = s2 / "progress.jsonl"
    left = 4 - kill_after_rows(cmd, env, progress, 1)
    assert 1 <= left <= 3

    merged = tmp_path / "merged"
    with pytest.raises(MergeError, match=rf"{s2} \(shard 2/2\) lacks the rows of {left} of its 4 prompts; finish it with: "
                                         r"cai generate sft .*--shard 2/2 "):
        merge_shards([tmp_path / "s1", s2], merged, keep_unrevised=True)
    assert not merged.exists() and not list(tmp_path.glob(".merged*"))

    with pytest.raises(RunMismatchError, match="shard: was '1/2', now '2/2'"):  # another share into a shard's folder
        generate_sft(one.model_copy(update={"shard": "2/2"}))
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)  # the killed shard, rerun on its own
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [r["id"] for r in _lines(progress)]
    assert len(ids) == len(set(ids)) == 4  # its own prompts, each once

    before = {s: _files(tmp_path / s) for s in ("s1", "s2")}
    result = CliRunner().invoke(app, ["generate", "merge", str(s2), str(tmp_path / "s1"), "--out", str(merged), "--keep-unrevised"])
    assert result.exit_code == 0, result.output
    assert {s: _files(tmp_path / s) for s in ("s1", "s2")} == before  # the shards are only read
    for name in ("sft.jsonl", "revision_pairs.jsonl"):
        assert _lines(merged / name) == _lines(tmp_path / "whole" / name), name  # same rows, same order
    summary = json.loads((merged / "summary.json").read_text())
    assert summary["rows"] == whole["rows"] and summary["prompts"] == 8
    assert summary["revisions_rejected"] == whole["revisions_rejected"]
    assert [(s["shard"], s["rows"]) for s in summary["shards"]] == [("1/2", 4), ("2/2", 4)]
    assert summary["output"] == str(merged / "sft.jsonl")
    from datasets import load_from_disk

    assert load_from_disk(str(merged / "dataset")).to_list() == load_from_disk(str(tmp_path / "whole" / "dataset")).to_list()

    # What the merge refuses.
    with pytest.raises(MergeError, match="already exists and is not an empty folder"):
        merge_shards([tmp_path / "s1", s2], merged)
    with pytest.raises(MergeError, match=rf"shard 2/2 missing: the job has 2 shards .*1/2 in {tmp_path / 's1'}"):
        merge_shards([tmp_path / "s1"], tmp_path / "m1")
    with pytest.raises(MergeError, match="shard 1/2 is given twice"):
        merge_shards([tmp_path / "s1", tmp_path / "s1", s2], tmp_path / "m2")
    other = tmp_path / "other"
    shutil.copytree(s2, other)
    settings = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**settings, "seed": 1}))  # a shard of the job made with another seed
    with pytest.raises(MergeError, match=rf"{tmp_path / 's1'} and {other} are shards of different jobs \(seed: 0 vs 1\)"):
        merge_shards([tmp_path / "s1", other], tmp_path / "m3")
    twice = tmp_path / "twice"
    shutil.copytree(s2, twice)
    row = _lines(tmp_path / "s1" / "progress.jsonl")[0]
    with open(twice / "progress.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")  # a row of shard 1 in shard 2's folder
    with pytest.raises(MergeError, match=rf"row {row['id']} is in both {tmp_path / 's1'} and {twice} \(the same row\)"):
        merge_shards([tmp_path / "s1", twice], tmp_path / "m4")
    with open(twice / "progress.jsonl", "a") as f:
        f.write(json.dumps({**row, "final_response": "changed"}) + "\n")
    with pytest.raises(MergeError, match=rf"row {row['id']} is in both .* \(with different content\)"):
        merge_shards([tmp_path / "s1", twice], tmp_path / "m4")
    with pytest.raises(MergeError, match=r"whole: not a shard's folder \(no shard.json"):
        merge_shards([tmp_path / "whole", s2], tmp_path / "m5")
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3", "m4", "m5"))


@pytest.mark.slow
def test_prefs_shards_merge_into_the_unsharded_run(tiny_model_dir, judge, judge_constitution, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    common = {"prompts": str(_prompts(tmp_path, 5)), "policy": str(tiny_model_dir), "constitution": str(judge_constitution),
              "judge_url": judge.url, "samples": 2, "sampling": SamplingConfig(max_new_tokens=8, temperature=1.0), "chunk_size": 1,
              "policy_backend": "transformers"}
    whole = generate_prefs(PrefsJob(**common, out=tmp_path / "whole", judge_cache=tmp_path / "c0.sqlite"))
    assert whole["rows"] >= 2
    shards = [tmp_path / f"s{i}" for i in (1, 2, 3)]
    for i, out in enumerate(shards, 1):
        generate_prefs(PrefsJob(**common, out=out, shard=f"{i}/3", judge_cache=tmp_path / f"c{i}.sqlite"))
    with pytest.raises(MergeError, match="--keep-unrevised is a choice of sft's rows; these are shards of a prefs job"):
        merge_shards(shards, tmp_path / "merged", keep_unrevised=True)
    summary = merge_shards(shards, tmp_path / "merged")
    assert _lines(tmp_path / "merged" / "prefs.jsonl") == _lines(tmp_path / "whole" / "prefs.jsonl")
    assert summary["rows"] == whole["rows"] and summary["label_entropy_bits"] == whole["label_entropy_bits"]
