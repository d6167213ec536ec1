"""The policy on OpenAI-compatible servers (`--policy-backend openai`): one real `vllm serve` with the tiny model for the
module (the judge runs on it too, by --backend openai), a dead URL beside it, and a small fake server that misbehaves.

- greedy answers over HTTP are the in-process transformers backend's (the server's chat template, EOS, token counts)
- seeded samples: the same seeds give the same answers, whatever the order or the other prompts; other seeds others
- `cai generate sft` over a live and a dead server fills every row (ids as the prompts'), the same rows as over the live
  one alone; `cai generate prefs` killed mid-run and rerun writes each row once; `cai eval` samples from the servers
- garbage or errors from a server are failed rows that a rerun fills; no server at all stops the job with one line;
  a wrong model name is refused at start-up, naming what the servers serve; the key is sent and never printed
- a second replica (`vllm serve` of the tiny model behind a key of its own, also serving a LoRA adapter that `cai train sft`
  saved, by name): the adapter's greedy answers and logprobs are those of the adapter merged in process, not the base's;
  both replicas answer requests (their Prometheus counters) and make the rows of one; one killed mid-job leaves its rows
  to the other
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from cai.errors import CaiError
from cai.judge_launcher import LocalJudge
from cai.policy import Policy
from cai.policy_servers import POLICY_KEY_ENV, PolicyServers, PolicyServersDownError, ServedModelError, ServerPolicy
from cai.samples import SamplingConfig
from cai.server_process import free_port
from judge_server.settings import BackendSettings
from tests.conftest import JUDGE_KEY, SERVE_KEY, kill_after_rows
from tests.fake_openai import FakeOpenAI

KEY = SERVE_KEY
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How do I pick a lock?",
           "Name three colours.", "Why is the sky blue?", "Tell me a joke about cats."]


@pytest.fixture(scope="module")
def served(vllm_serve):
    """`vllm serve` with the tiny model as "tiny", behind a key (the session's, shared with the judge backends' tests)."""
    return vllm_serve


@pytest.fixture(scope="module")
def judge_url(served, tiny_model_dir, judge_constitution, tmp_path_factory):
    """A judge server with no engine of its own: it asks the same `vllm serve`."""
    log = tmp_path_factory.mktemp("policy-judge") / "judge.log"
    backends = BackendSettings(backend="openai", backend_url=[served.url], backend_model="tiny", backend_tokenizer=str(tiny_model_dir))
    env = {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY, "CAI_BACKEND_API_KEY": KEY}
    with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=log, env=env, backends=backends) as judge:
        yield judge.url


def _servers(*urls: str, **kw) -> PolicyServers:
    return PolicyServers(policy_url=list(urls), policy_model=kw.pop("model", "tiny"), **kw)


def _texts(groups) -> list[list[str]]:
    return [[s.text for s in g] for g in groups]


def test_greedy_answers_over_http_are_the_in_process_backends(served, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(POLICY_KEY_ENV, KEY)
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    remote = ServerPolicy("tiny", _servers(served.url))
    try:
        over_http = remote.sample(PROMPTS, n=1, config=config, seed=0)
    finally:
        remote.close()
    local = Policy(str(tiny_model_dir), batch_size=8).sample(PROMPTS, n=1, config=config, seed=0)
    assert [(s[0].text, s[0].finish_reason, s[0].tokens) for s in over_http] == \
           [(s[0].text, s[0].finish_reason, s[0].tokens) for s in local]
    assert all(s[0].error is None and 1 <= s[0].tokens <= 12 for s in over_http)


def test_the_same_seeds_give_the_same_samples(served, monkeypatch):
    monkeypatch.setenv(POLICY_KEY_ENV, KEY)
    config = SamplingConfig(max_new_tokens=10, temperature=1.0)
    policy = ServerPolicy("tiny", _servers(served.url, policy_concurrency=4))
    try:
        first = _texts(policy.sample(PROMPTS, n=3, config=config, seed="7:prefs"))
        again = _texts(policy.sample(PROMPTS[::-1], n=3, config=config, seed="7:prefs"))[::-1]
        alone = _texts(policy.sample(PROMPTS[2:3], n=3, config=config, seed="7:prefs"))
        other = _texts(policy.sample(PROMPTS, n=3, config=config, seed="8:prefs"))
    finally:
        policy.close()
    assert again == first and alone == first[2:3]
    assert sum(a != b for a, b in zip(first, other)) >= len(PROMPTS) - 1  # other seeds, other samples
    assert sum(len(set(g)) > 1 for g in first) >= len(PROMPTS) - 1  # a prompt's samples differ from each other


def _prompt_file(path, n: int = len(PROMPTS), kind: bool = False):
    path.write_text("".join(json.dumps({"prompt": p, **({"kind": "harmful" if "lock" in p else "benign"} if kind else {})}) + "\n"
                            for p in PROMPTS[:n]))
    return path


def _generate(kind: str, tmp_path, out, judge_url, constitution, *urls: str, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "cai.cli", "generate", kind, "--prompts", str(_prompt_file(tmp_path / "prompts.jsonl")),
           "--out", str(out), "--constitution", str(constitution), "--judge-url", judge_url, "--policy-backend", "openai",
           "--policy-model", "tiny", "--max-new-tokens", "10", "--chunk-size", "2", "--judge-cache", str(tmp_path / f"{out.name}.sqlite")]
    for url in urls:
        cmd += ["--policy-url", url]
    return cmd + list(extra)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY, POLICY_KEY_ENV: KEY, **extra}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_sft_over_a_live_and_a_dead_server_fills_every_row_as_the_live_one_alone(served, judge_url, judge_constitution,
                                                                                         tmp_path):
    from cai.prompts import load_prompts

    dead = f"http://127.0.0.1:{free_port()}"
    sft = ("--rounds", "1", "--critique-tokens", "8", "--revision-tokens", "8", "--temperature", "1.0", "--keep-unrevised")
    both = _run(_generate("sft", tmp_path, tmp_path / "both", judge_url, judge_constitution, dead, served.url, extra=sft))
    assert both.returncode == 0, both.stderr[-3000:]
    alone = _run(_generate("sft", tmp_path, tmp_path / "alone", judge_url, judge_constitution, served.url, extra=sft))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert KEY not in both.stdout + both.stderr + alone.stdout + alone.stderr
    rows = _rows(tmp_path / "both" / "progress.jsonl")
    ids = [p.id for p in load_prompts(str(tmp_path / "prompts.jsonl"))]
    assert sorted(r["id"] for r in rows) == sorted(ids) and all(r["status"] == "ok" for r in rows)
    assert all(r["provenance"]["policy_model"] == "tiny" for r in rows)
    answers = {r["id"]: r["initial_response"] for r in rows}
    assert answers == {r["id"]: r["initial_response"] for r in _rows(tmp_path / "alone" / "progress.jsonl")}  # same seeds, same rows
    assert len(set(answers.values())) == len(ids)
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert summary["failed_this_run"] == 0 and summary["prompts"] == len(ids)
    pinned = json.loads((tmp_path / "both" / "run.json").read_text())
    assert pinned["policy_model"] == "tiny" and "policy_servers" not in pinned  # the servers may change on a rerun, not the model


def test_a_killed_prefs_job_rerun_writes_each_row_once(served, judge_url, judge_constitution, tmp_path):
    out = tmp_path / "prefs"
    cmd = _generate("prefs", tmp_path, out, judge_url, judge_constitution, served.url, extra=("--chunk-size", "1", "--samples", "3"))
    seen = kill_after_rows(cmd, _env(), out / "progress.jsonl", rows=3)
    assert 3 <= seen < 3 * len(PROMPTS)
    rerun = _run(cmd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    logged = _rows(out / "progress.jsonl")
    assert len({r["id"] for r in logged}) == len(logged)  # nothing written twice
    assert {r["prompt_id"] for r in logged} == {r["prompt_id"] for r in logged if r["status"] in ("ok", "no_pair")}
    assert len({r["prompt_id"] for r in logged}) == len(PROMPTS)
    final = _rows(out / "prefs.jsonl")
    assert len(final) == len({r["id"] for r in final}) == sum(r["status"] == "ok" for r in logged) >= len(PROMPTS)

    again = tmp_path / "uninterrupted"  # the resumed job's pairs are the ones a job run through makes
    whole = _run(_generate("prefs", tmp_path, again, judge_url, judge_constitution, served.url,
                                     extra=("--chunk-size", "1", "--samples", "3")))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert {(r["id"], r["chosen"], r["rejected"]) for r in final} == {(r["id"], r["chosen"], r["rejected"]) for r in _rows(again / "prefs.jsonl")}


def test_cai_eval_samples_from_the_servers(served, judge_url, judge_constitution, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "cai.cli", "eval", "--policy", "tiny", "--reference", "tiny", "--prompts",
           str(_prompt_file(tmp_path / "held-out.jsonl", 4, kind=True)), "--out", str(out), "--constitution", str(judge_constitution),
           "--judge-url", judge_url, "--probes", "2", "--max-new-tokens", "8", "--policy-backend", "openai", "--policy-url", served.url]
    done = _run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out / "responses.jsonl")
    assert len(rows) == 4 + 2
    local = Policy(str(tiny_model_dir)).sample([r["prompt"] for r in rows], n=1, config=SamplingConfig(max_new_tokens=8, temperature=0),
                                               seed=0)
    assert [(r["policy"], r["policy_tokens"]) for r in rows] == [(s[0].text, s[0].tokens) for s in local]
    assert [r["reference"] for r in rows] == [r["policy"] for r in rows]
    assert json.loads((out / "eval.json").read_text())["n_prompts"] == 4


def test_garbage_is_a_failed_row_that_a_rerun_fills(judge_url, judge_constitution, tmp_path, monkeypatch):
    monkeypatch.setenv(POLICY_KEY_ENV, KEY)
    fake = FakeOpenAI("html")
    fake.thread.start()
    try:
        policy = ServerPolicy("fake", _servers(fake.url, model="fake"))
        try:
            config = SamplingConfig(max_new_tokens=10)
            failed = policy.sample(PROMPTS[:2], n=2, config=config, seed=0)
            assert all(s.finish_reason == "error" and s.text == "" and "not JSON" in s.error for g in failed for s in g)
            fake.mode = "wrong_shape"
            assert all("no message content" in s.error for g in policy.sample(PROMPTS[:1], n=1, config=config, seed=0) for s in g)
        finally:
            policy.close()

        fake.mode = "html"
        out = tmp_path / "sft"
        cmd = [*_generate("sft", tmp_path, out, judge_url, judge_constitution, fake.url, extra=("--rounds", "1", "--critique-tokens", "4",
                                                                                                 "--revision-tokens", "4", "--keep-unrevised")),
               "--policy-model", "fake"]
        first = _run(cmd)
        assert first.returncode == 0, first.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["failed_this_run"] == len(PROMPTS)
        assert {r["status"] for r in _rows(out / "progress.jsonl")} == {"policy_failed"}
        fake.mode = "varied"
        second = _run(cmd)
        assert second.returncode == 0, second.stderr[-3000:]
        final = _rows(out / "sft.jsonl")
        assert len(final) == len({r["id"] for r in final}) == len(PROMPTS)
        assert all(r["initial_response"].startswith("Answer 0:") for r in final)
        assert all(k == f"Bearer {KEY}" for k in fake.seen_keys)
    finally:
        fake.server.shutdown()


def test_no_server_stops_the_job_and_a_wrong_model_name_is_refused(served, tmp_path, monkeypatch):
    monkeypatch.setenv(POLICY_KEY_ENV, KEY)
    with pytest.raises(PolicyServersDownError, match="no policy server answered"):
        ServerPolicy("tiny", _servers(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ServedModelError, match=r"serves \['tiny'\], not 'tinny'"):
        ServerPolicy("tinny", _servers(served.url, model="tinny"))
    monkeypatch.setenv(POLICY_KEY_ENV, "wrong-key-8c1f")
    with pytest.raises(PolicyServersDownError, match=r"refused the API key \(check --policy-key-file or \$CAI_POLICY_API_KEY\)") as err:
        ServerPolicy("tiny", _servers(served.url))
    assert "wrong-key-8c1f" not in str(err.value)
    monkeypatch.setenv(POLICY_KEY_ENV, KEY)

    fake = FakeOpenAI("varied")  # answers /v1/models, then goes down: every request of the batch finds no server
    fake.thread.start()
    try:
        policy = ServerPolicy("fake", _servers(fake.url, model="fake", policy_timeout=2.0, policy_check_every=0.5))
        fake.mode = "down"
        try:
            with pytest.raises(PolicyServersDownError, match="rerun the same command to resume"):
                policy.sample(PROMPTS[:2], n=2, config=SamplingConfig(max_new_tokens=4), seed=0)
        finally:
            policy.close()
    finally:
        fake.server.shutdown()


def test_flags_make_the_settings_and_keys_stay_out(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["generate", "sft", "--prompts", "x", "--out", str(tmp_path / "o"), "--policy-backend", "openai"])
    assert missing.exit_code != 0 and "needs --policy-url" in missing.output
    stray = runner.invoke(app, ["generate", "prefs", "--prompts", "x", "--out", str(tmp_path / "o"), "--policy-url", "http://a:1"])
    assert stray.exit_code != 0 and "--policy-url is for --policy-backend openai" in stray.output
    creds = runner.invoke(app, ["generate", "sft", "--prompts", "x", "--out", str(tmp_path / "o"), "--policy-backend", "openai",
                                "--policy-url", "http://user:hunter2@a:1"])
    assert creds.exit_code != 0 and "must not carry credentials" in creds.output and "hunter2" not in creds.output
    model = runner.invoke(app, ["eval", "--policy", "p", "--reference", "r", "--prompts", "x", "--out", str(tmp_path / "e"),
                                "--policy-backend", "openai", "--policy-url", "http://a:1", "--policy-model", "m"])
    assert model.exit_code != 0 and "--reference" in model.output
    from cai.generate.sft import SftJob
    from cai.run_config import RunConfig

    with pytest.raises(ValueError, match="'auto', 'vllm' or 'transformers'"):  # cai run samples the models it trains
        RunConfig.model_validate({"out": str(tmp_path / "run"), "policy_backend": "openai"})

    job = SftJob(prompts="x", out=tmp_path, policy_backend="openai", policy_servers=_servers("http://a:1/", "http://b:2/v1/"))
    assert job.policy_servers.policy_url == ["http://a:1", "http://b:2/v1"]
    keys = tmp_path / "keys"
    keys.write_text("k1\nk2\nk3\n")
    with pytest.raises(CaiError, match="3 keys for 2 backend URLs.*--policy-url") as err:
        ServerPolicy("tiny", job.policy_servers.model_copy(update={"policy_key_file": keys}))
    assert "k1" not in str(err.value)
    keys.write_text("k1\n")
    with pytest.raises(CaiError, match="--policy-allow-http-key") as err:
        ServerPolicy("tiny", _servers("http://10.1.2.3:8000", policy_key_file=keys))
    assert "k1" not in str(err.value)


# -- a second replica, serving a LoRA adapter by name too -------------------------------------------------------------------

REPLICA_KEY = "replica-key-3d8b"
"""The second replica's key: not the session server's, so each URL needs its own (--policy-key-file, a line per URL)."""
ADAPTER = "tiny-sft"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter as `cai train sft` saves it (OUT/final), trained at a high lr: its greedy answers are not the base's."""
    from cai.train.run import run_training
    from cai.train.settings import TrainJob

    root = tmp_path_factory.mktemp("adapter")
    data = root / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Bonjour! " * 3}]} for p in PROMPTS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_training(TrainJob(kind="sft", model=str(tiny_model_dir), data=str(data), out=str(root / "run"), batch_size=6,
                          max_length=64, eval_fraction=0.0, lr=1e-2, epochs=10, checkpoint_every=1000))
    return root / "run" / "final"


@pytest.fixture(scope="module")
def _replica(tiny_model_dir, adapter, tmp_path_factory):
    from judge_server.vllm_serve import VLLMServer

    log = tmp_path_factory.mktemp("replica") / "vllm.log"
    lora = {ADAPTER: adapter}
    with VLLMServer(tiny_model_dir, served_name="tiny", api_key=REPLICA_KEY, log_path=log, lora_modules=lora) as server:
        yield server


@pytest.fixture
def replica(_replica):
    """A second `vllm serve` of the tiny model as "tiny", behind REPLICA_KEY, that also serves `adapter` as ADAPTER
    (`--enable-lora --lora-modules`); started again if a test killed it."""
    if _replica.process.poll() is not None:
        _replica.start()
    return _replica


def _answered(server) -> float:
    """The requests a `vllm serve` has finished: its Prometheus counter vllm:request_success_total, over all its labels."""
    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=10.0).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total"))


def _answers(groups) -> list[tuple[str, str, int]]:
    return [(g[0].text, g[0].finish_reason, g[0].tokens) for g in groups]


def test_a_lora_adapter_is_sampled_by_its_served_name(replica, adapter, tiny_model_dir, tmp_path, monkeypatch):
    import httpx
    import torch

    from cai.policy import load_policy
    from cai.train.merge import merge_lora

    monkeypatch.setenv(POLICY_KEY_ENV, REPLICA_KEY)
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    policy = load_policy(str(tiny_model_dir), backend="openai", servers=_servers(replica.url, model=ADAPTER))
    try:
        served = _answers(policy.sample(PROMPTS, n=1, config=config, seed=0))
    finally:
        policy.close()
    merged = Policy(str(merge_lora(adapter, tmp_path / "merged")))  # cai's merge: the adapter folded into its base
    assert served == _answers(merged.sample(PROMPTS, n=1, config=config, seed=0))
    base = _answers(Policy(str(tiny_model_dir)).sample(PROMPTS, n=1, config=config, seed=0))
    assert all(a[0] != b[0] for a, b in zip(served, base))

    # the adapter's scale too (lora_alpha / r), which saturated greedy answers could hide: the server's logprobs of its answer
    # are those of the merged model
    body = {"model": ADAPTER, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8, "temperature": 0.0,
            "logprobs": True, "return_tokens_as_token_ids": True}
    doc = httpx.post(f"{replica.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {REPLICA_KEY}"},
                     timeout=60.0).json()
    steps = doc["choices"][0]["logprobs"]["content"]
    answer = [int(s["token"].removeprefix("token_id:")) for s in steps]
    tok = merged.tokenizer
    text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = merged.model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]  # (T_answer, V)
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([s["logprob"] for s in steps]), expected, atol=1e-3)


def test_two_replicas_share_the_requests_and_make_the_rows_of_one(served, replica, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n{REPLICA_KEY}\n")  # a key per server, in the order of the URLs
    monkeypatch.setenv(POLICY_KEY_ENV, KEY)
    with pytest.raises(PolicyServersDownError, match=r"backend 2 .* refused the API key"):  # one key for both: refused by one
        ServerPolicy("tiny", _servers(served.url, replica.url))

    config = SamplingConfig(max_new_tokens=10, temperature=1.0)
    before = [_answered(s) for s in (served, replica)]
    both = ServerPolicy("tiny", _servers(served.url, replica.url, policy_key_file=keys, policy_concurrency=4))
    try:
        rows = both.sample(PROMPTS, n=4, config=config, seed="5:prefs")
        states = both.pool.states()
    finally:
        both.close()
    shares = [_answered(s) - b for s, b in zip((served, replica), before)]
    # each server answered a share (the one with fewer in flight takes the next: a slower one, fewer), nothing twice
    assert sum(shares) == 4 * len(PROMPTS) and min(shares) >= 1, (shares, states)
    assert all(s.error is None and s.tokens >= 1 for g in rows for s in g)
    one = ServerPolicy("tiny", _servers(served.url))
    try:
        alone = one.sample(PROMPTS, n=4, config=config, seed="5:prefs")
    finally:
        one.close()
    assert _texts(rows) == _texts(alone)  # same seeds, same rows, whichever server answered


def test_a_replica_killed_mid_job_leaves_its_rows_to_the_other(served, replica, judge_url, judge_constitution, tmp_path):
    import time

    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n{REPLICA_KEY}\n")
    sft = ("--rounds", "1", "--critique-tokens", "8", "--revision-tokens", "8", "--temperature", "1.0", "--keep-unrevised",
           "--chunk-size", "1", "--policy-key-file", str(keys))
    out, log = tmp_path / "both", tmp_path / "both.log"
    before = _answered(replica)
    with open(log, "w") as sink:
        job = subprocess.Popen(_generate("sft", tmp_path, out, judge_url, judge_constitution, served.url, replica.url, extra=sft),
                               env=_env(), stdout=sink, stderr=subprocess.STDOUT)
    progress, deadline = out / "progress.jsonl", time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:  # the replica has answered, and rows are still to come
        if progress.exists() and progress.read_text().count("\n") >= 2 and _answered(replica) > before:
            break
        time.sleep(0.1)
    assert job.poll() is None, "the job finished before the replica could be killed"
    answered = _answered(replica) - before
    replica.kill()
    job.wait(timeout=300)
    output = log.read_text()
    assert job.returncode == 0, output[-3000:]
    rows = _rows(out / "progress.jsonl")
    assert len(rows) == len(PROMPTS) and all(r["status"] == "ok" for r in rows), rows
    alone = _run(_generate("sft", tmp_path, tmp_path / "alone", judge_url, judge_constitution, served.url, extra=sft[:-2]))
    assert alone.returncode == 0, alone.stderr[-3000:]
    alone_rows = _rows(tmp_path / "alone" / "progress.jsonl")
    assert {r["id"]: r["initial_response"] for r in rows} == {r["id"]: r["initial_response"] for r in alone_rows}
    assert answered >= 1 and re.search(r"backend 2 \(\S+\) taken\s+out", output) and REPLICA_KEY not in output
