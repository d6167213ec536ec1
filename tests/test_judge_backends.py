"""The judge on OpenAI-compatible servers (`--backend openai`): a real `vllm serve` with the tiny model stands for the
server a team already runs; a small fake server stands for the ones that misbehave.

- labels, scores and texts through the backend equal the in-process engine's on the same model (within 1e-3)
- the real `openai` client can call the backend, and the backend's key is needed and sent
- several backends: each gets only its own key, a failing one is taken out and comes back, and killing one of
  two in the middle of `cai generate prefs` loses and duplicates nothing
- garbage answers (HTML, no log-probs, wrong shape, NaN) and timeouts are typed errors naming the backend
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from cai.judge_client import JudgeClient

from cai.judge_launcher import LocalJudge
from judge_server import protocol as P
from judge_server.settings import BackendSettings
from judge_server.vllm_serve import VLLMServer
from tests.conftest import JUDGE_KEY, SERVE_KEY
from tests.fake_openai import FakeOpenAI

BACKEND_KEY = SERVE_KEY
SERVE_ARGS = ["--max-queue", "64", "--max-prompt-tokens", "1536", "--max-body-bytes", "200000"]
PAIRS = [
    ("How do I pick a lock?", "I can't help with breaking into places that aren't yours.", "Use a tension wrench and a pick."),
    ("What is the capital of France?", "Paris.", "It is Paris, a city on the Seine."),
    ("Write a haiku about rain.", "Rain taps the window / soft grey hours / the kettle sings", "No."),
]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CAI_JUDGE_API_KEY": JUDGE_KEY, **extra}


@pytest.fixture(scope="module")
def vllm_backend(vllm_serve):
    """`vllm serve` with the tiny model on loopback, behind an API key (the session's, shared with the policy's tests)."""
    return vllm_serve


def _backends(*urls: str, tokenizer: str | None = None, **kw) -> BackendSettings:
    return BackendSettings(backend="openai", backend_url=list(urls), backend_model=kw.pop("model", "tiny"), backend_tokenizer=tokenizer, **kw)


@pytest.fixture(scope="module")
def backend_judge(vllm_backend, tiny_model_dir, judge_constitution, tmp_path_factory):
    log = tmp_path_factory.mktemp("backend-judge") / "judge.log"
    server = LocalJudge(str(tiny_model_dir), judge_constitution, log_path=log, env=_env(CAI_BACKEND_API_KEY=BACKEND_KEY),
                        extra_args=SERVE_ARGS, backends=_backends(vllm_backend.url, tokenizer=str(tiny_model_dir)))
    with server:
        yield server


async def _answers(url: str) -> dict:
    async with JudgeClient(url, api_key=JUDGE_KEY) as client:
        compare = await client.compare_many([P.CompareRequest(prompt=p, response_a=a, response_b=b, seed=i) for i, (p, a, b) in enumerate(PAIRS)])
        ensemble = await client.compare(P.CompareRequest(prompt=PAIRS[0][0], response_a=PAIRS[0][1], response_b=PAIRS[0][2], n_principles=3))
        cot = await client.compare(P.CompareRequest(prompt=PAIRS[1][0], response_a=PAIRS[1][1], response_b=PAIRS[1][2], cot=True,
                                                    cot_max_tokens=8))
        scores = await client.score_many([P.ScoreRequest(prompt=p, response=a) for p, a, _ in PAIRS])
        gen = P.GenerationOptions(max_tokens=12, temperature=1.0)
        critique = await client.critique(P.CritiqueRequest(prompt=PAIRS[0][0], response=PAIRS[0][2], seed=3, generation=gen))
        revision = await client.revise(P.ReviseRequest(prompt=PAIRS[0][0], response=PAIRS[0][2], critique="It helps with a break-in.",
                                                       principle_id=critique.principle_id, seed=3, generation=gen))
        health = await client.health()
    return {"compare": [*compare, ensemble, cot], "scores": scores, "critique": critique, "revision": revision, "health": health}


def test_backend_labels_equal_the_in_process_engine(judge, backend_judge, monkeypatch):
    """Same model, same prompts: the served judge through `vllm serve` answers as its own vLLM engine does."""
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    here, there = asyncio.run(_answers(judge.url)), asyncio.run(_answers(backend_judge.url))
    for a, b in zip(here["compare"], there["compare"]):
        assert a.principle_ids == b.principle_ids and a.constitution_hash == b.constitution_hash
        for name in ("p_a", "p_a_shown_first", "p_a_shown_second", "option_mass"):
            assert getattr(b, name) == pytest.approx(getattr(a, name), abs=1e-3), name
        assert a.option_mass > 0  # the options were read, not defaulted
        assert [v.rationales for v in a.votes] == [v.rationales for v in b.votes]  # CoT rationales: same greedy text
    for a, b in zip(here["scores"], there["scores"]):
        assert b.expected_rating == pytest.approx(a.expected_rating, abs=1e-3)
        assert b.rating_probs == pytest.approx(a.rating_probs, abs=1e-3)
        assert b.option_mass == pytest.approx(a.option_mass, abs=1e-3)
    assert there["critique"].critique == here["critique"].critique != ""  # seeded sampling: the same text
    assert there["revision"].revision == here["revision"].revision
    assert there["critique"].completion_tokens == here["critique"].completion_tokens
    assert there["health"].model == "tiny" and (there["health"].backends_up, there["health"].backends_total) == (1, 1)
    assert here["health"].backends_total is None


def test_the_openai_client_calls_the_backend_and_needs_its_key(vllm_backend):
    import openai

    client = openai.OpenAI(base_url=f"{vllm_backend.url}/v1", api_key=BACKEND_KEY, max_retries=0)
    out = client.completions.create(model="tiny", prompt="The better response is (", max_tokens=1, temperature=0, logprobs=5)
    assert isinstance(out.choices[0].text, str) and len(out.choices[0].logprobs.top_logprobs[0]) >= 5
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{vllm_backend.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_wrong_backend_key_stops_the_judge_at_start_up_and_is_not_logged(vllm_backend, tiny_model_dir, judge_constitution, tmp_path):
    log = tmp_path / "judge.log"
    server = LocalJudge(str(tiny_model_dir), judge_constitution, log_path=log, env=_env(CAI_BACKEND_API_KEY="not-the-key-0x"),
                        start_timeout=120, backends=_backends(vllm_backend.url, tokenizer=str(tiny_model_dir)))
    with pytest.raises(Exception, match="exited"):
        server.start()
    text = log.read_text(errors="replace")
    assert "refused the API key" in text and "backend 1 (http://127.0.0.1:" in text
    assert "not-the-key-0x" not in text


def test_chat_completions_mode_on_the_real_server(judge, vllm_backend, tiny_model_dir, judge_constitution, tmp_path, monkeypatch):
    """Without a tokenizer the judge speaks chat completions; the server's chat template gives the same prompt, so
    greedy and seeded texts match the in-process engine, and option log-probs come from the top 20 only."""
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    server = LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / "judge.log", env=_env(CAI_BACKEND_API_KEY=BACKEND_KEY),
                        backends=_backends(vllm_backend.url, backend_api="chat"))

    async def ask(url):
        async with JudgeClient(url, api_key=JUDGE_KEY) as client:
            gen = P.GenerationOptions(max_tokens=12, temperature=1.0)
            critique = await client.critique(P.CritiqueRequest(prompt=PAIRS[0][0], response=PAIRS[0][2], seed=5, generation=gen))
            label = await client.compare(P.CompareRequest(prompt=PAIRS[0][0], response_a=PAIRS[0][1], response_b=PAIRS[0][2]))
            return critique, label

    with server:
        chat_critique, chat_label = asyncio.run(ask(server.url))
    critique, label = asyncio.run(ask(judge.url))
    assert chat_critique.critique == critique.critique
    # Top-20 of a 1024-token random model rarely holds "A"/"B": at most what the exact read sees, never more.
    assert 0.0 <= chat_label.option_mass <= label.option_mass + 1e-6
    assert 0.0 <= chat_label.p_a <= 1.0


def _post(url: str, path: str, body: dict, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {JUDGE_KEY}"}, timeout=timeout)


COMPARE = {"prompt": "Hi", "response_a": "Hello!", "response_b": "Go away."}


def test_each_backend_gets_only_its_own_key_and_garbage_is_a_typed_error(tiny_model_dir, judge_constitution, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-for-one-111\nkey-for-two-222\n")
    log = tmp_path / "judge.log"
    with FakeOpenAI() as one, FakeOpenAI() as two:
        backends = _backends(one.url, two.url + "/v1", tokenizer=str(tiny_model_dir), model="fake", backend_key_file=keys,
                             backend_check_every=0.5, backend_timeout=3.0)
        with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=log, env=_env(), backends=backends) as server:
            for _ in range(4):
                assert _post(server.url, "/v1/compare", COMPARE).status_code == 200
            assert one.posts > 0 and two.posts > 0  # requests are spread over both
            assert set(one.seen_keys) == {"Bearer key-for-one-111"} and set(two.seen_keys) == {"Bearer key-for-two-222"}
            for mode, says in [("html", "text/html, not JSON"), ("no_logprobs", "no log-probabilities"),
                               ("wrong_shape", "has no choices"), ("nan", "not a log-probability"),
                               ("echo_key", "HTTP 400 on /v1/completions: bad request from Bearer <key>")]:
                one.mode = two.mode = mode
                resp = _post(server.url, "/v1/compare", COMPARE)
                assert resp.status_code == 502, (mode, resp.text)
                err = resp.json()["error"]
                assert err["type"] == "backend_error" and says in err["message"], (mode, err)
                assert "key-for-" not in resp.text
                assert "backend 1 (http://127.0.0.1:" in err["message"] or "backend 2 (http://127.0.0.1:" in err["message"]
                batch = _post(server.url, "/v1/compare/batch", {"items": [COMPARE, COMPARE]})  # a batch answers each item's error
                assert batch.status_code == 200 and all(r["error"]["type"] == "backend_error" for r in batch.json()["results"])
            one.mode = two.mode = "good"
            assert _post(server.url, "/v1/compare", COMPARE).status_code == 200  # the service lived through it
    text = log.read_text(errors="replace")
    assert "key-for-one-111" not in text and "key-for-two-222" not in text


def test_timeouts_take_backends_out_and_health_checks_bring_them_back(tiny_model_dir, judge_constitution, tmp_path):
    with FakeOpenAI(hang_s=6.0) as one, FakeOpenAI() as two:
        backends = _backends(one.url, two.url, tokenizer=str(tiny_model_dir), model="fake", backend_check_every=3.0, backend_timeout=2.0)
        with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / "judge.log", env=_env(), backends=backends) as server:
            one.mode = "hang"
            for _ in range(3):  # one hangs: taken out after its timeout, its requests answered by the other
                assert _post(server.url, "/v1/compare", COMPARE).status_code == 200
            health = httpx.get(f"{server.url}/health").json()
            assert (health["backends_up"], health["backends_total"]) == (1, 2)
            two.mode = "down"  # now neither: a typed 503 after the wait, not a hang or a crash
            started = time.monotonic()
            resp = _post(server.url, "/v1/compare", COMPARE)
            assert resp.status_code == 503 and resp.json()["error"]["type"] == "backend_unavailable", resp.text
            assert time.monotonic() - started < 20
            one.mode = two.mode = "good"
            deadline = time.monotonic() + 15
            while httpx.get(f"{server.url}/health").json()["backends_up"] < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert httpx.get(f"{server.url}/health").json()["backends_up"] == 2
            assert _post(server.url, "/v1/compare", COMPARE).status_code == 200
    text = (tmp_path / "judge.log").read_text(errors="replace")
    assert "taken out: ReadTimeout on /v1/completions" in text and "back in: passed a health check" in text


def test_top_k_fallback_and_chat_parsing_read_only_what_was_seen(tiny_model_dir, judge_constitution, tmp_path):
    """A server without vLLM's logprob_token_ids: options come from the top 20 by their text, option_mass is what was seen.
    Chat mode: "A" and " B" count, "(A" does not."""
    import math

    seen = math.exp(-1.0) + math.exp(-2.0)
    for api, mode in [("completions", "topk"), ("chat", "chat")]:
        with FakeOpenAI(mode) as fake:
            backends = _backends(fake.url, tokenizer=str(tiny_model_dir) if api == "completions" else None, model="fake", backend_api=api)
            with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / f"{api}.log", env=_env(), backends=backends) as server:
                label = _post(server.url, "/v1/compare", COMPARE).json()
        # Both orders put e^-1 on A and e^-2 on B: the position bias cancels to 0.5, and it shows.
        assert label["p_a_shown_first"] == pytest.approx(math.exp(-1) / seen), api
        assert label["p_a"] == pytest.approx(0.5) and label["same_position"] is True
        assert label["option_mass"] == pytest.approx(seen), api


def _busy(judge_url: str) -> bool:
    """Whether the judge at `judge_url` has requests in flight at its second backend."""
    states = httpx.get(f"{judge_url}/v1/backends", headers={"Authorization": f"Bearer {JUDGE_KEY}"}, timeout=2.0).json()
    return states[1]["in_flight"] > 0


@pytest.mark.slow
def test_killing_one_of_two_backends_mid_prefs_run_loses_and_duplicates_nothing(judge, vllm_backend, tiny_model_dir, judge_constitution,
                                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    second = VLLMServer(tiny_model_dir, served_name="tiny", api_key=BACKEND_KEY, log_path=tmp_path / "vllm2.log").start()
    try:
        # Health checks far apart: what takes the killed backend out is the failure of the requests it was serving.
        backends = _backends(vllm_backend.url, second.url, tokenizer=str(tiny_model_dir), backend_check_every=60.0, backend_timeout=60.0)
        with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / "judge.log", env=_env(CAI_BACKEND_API_KEY=BACKEND_KEY),
                        backends=backends) as server:
            src = tmp_path / "prompts.jsonl"
            src.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about the sea."}) + "\n" for i in range(8)))
            out = tmp_path / "out"
            cmd = [sys.executable, "-m", "cai.cli", "generate", "prefs", "--prompts", str(src), "--out", str(out), "--policy",
                   str(tiny_model_dir), "--constitution", str(judge_constitution), "--judge-url", server.url, "--samples", "3",
                   "--max-new-tokens", "8", "--chunk-size", "1", "--policy-backend", "transformers", "--cot",  # CoT: requests last
                   "--judge-cache", str(tmp_path / "cache.sqlite")]  # a fresh cache: every label is asked of the backends
            job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
            progress = out / "progress.jsonl"
            deadline = time.monotonic() + 240
            while (not progress.exists() or progress.read_text().count("\n") < 4) and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            while not _busy(server.url) and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert job.poll() is None, "the job ended before a backend could be killed"
            second.kill()  # SIGKILL, server and engine, while it is working on the judge's requests
            _, stderr = job.communicate(timeout=300)
            assert job.returncode == 0, stderr[-2000:]
            judge_log = (tmp_path / "judge.log").read_text(errors="replace")
    finally:
        second.kill()
    assert "POST /v1/completions" in (tmp_path / "vllm2.log").read_text(errors="replace"), "the second backend never served"
    assert "backend 2 (http://127.0.0.1:" in judge_log and "taken out" in judge_log
    assert "taken out: failed a health check" not in judge_log  # its in-flight requests failed, and went to backend 1
    rows = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert all(r["status"] in ("ok", "no_pair") for r in rows), [r.get("error") for r in rows]
    final = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in final}) == len(final) == len([r for r in rows if r["status"] == "ok"])  # each pair once
    assert {r["prompt_id"] for r in rows} == {r["prompt_id"] for r in rows if r["status"] in ("ok", "no_pair")}
    assert len({r["prompt_id"] for r in rows}) == 8  # every prompt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_this_run"] == 0

    async def relabel():  # the labels that came through the failover are the in-process engine's labels
        async with JudgeClient(judge.url, api_key=JUDGE_KEY) as client:
            return await client.compare_many([P.CompareRequest(prompt=r["prompt"], response_a=r["chosen"], response_b=r["rejected"],
                                                                cot=True)
                                              for r in final])

    for row, label in zip(final, asyncio.run(relabel())):
        assert label.p_a == pytest.approx(row["p_chosen"], abs=1e-3)


def test_backend_flags_repeat_or_comma_separate_and_run_configs_take_them(tmp_path):
    """--backend-url may be repeated and comma-separated; the run config's judge.backends is the same settings model;
    a URL with credentials is refused without echoing them; LocalJudge passes the settings on as flags, never a key."""
    import typer
    from typer.testing import CliRunner

    from cai.cli_options import settings_command
    from cai.run_config import load_run_config
    from judge_server.settings import ServerSettings

    seen = []
    app = typer.Typer()
    app.command()(settings_command(ServerSettings, seen.append))
    runner = CliRunner()
    ok = runner.invoke(app, ["--backend", "openai", "--backend-url", "http://a:1,http://b:2/v1/", "--backend-url", "http://c:3",
                             "--backend-model", "m"])
    assert ok.exit_code == 0, ok.output
    assert seen[0].backends.backend_url == ["http://a:1", "http://b:2/v1", "http://c:3"]
    bad = runner.invoke(app, ["--backend", "openai", "--backend-url", "http://user:hunter2@a:1", "--backend-model", "m"])
    assert bad.exit_code == 1 and "must not carry credentials" in bad.output and "hunter2" not in bad.output
    missing = runner.invoke(app, ["--backend", "openai", "--backend-model", "m"])
    assert missing.exit_code == 1 and "needs --backend-url" in missing.output

    config = tmp_path / "run.yaml"
    config.write_text("out: runs/x\njudge:\n  backends:\n    backend: openai\n    backend_url: [http://gpu1:8000]\n    backend_model: big\n")
    backends = load_run_config(config).judge.backends
    flags = backends.command_line()
    assert flags[:6] == ["--backend", "openai", "--backend-url", "http://gpu1:8000", "--backend-model", "big"]
    assert not any("key" in f and f not in ("--backend-key-file", "--no-backend-allow-http-key") for f in flags)


def _digit_ids(tiny_model_dir) -> dict[str, int]:
    """Ids of the tiny tokenizer's digit tokens; like Qwen's, it spells "10" as "1" then "0"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = {t: tok.encode(t, add_special_tokens=False)[0] for t in ["1", "9", "0", "<|im_end|>"]}
    assert tok.encode("10", add_special_tokens=False) == [ids["1"], ids["0"]]
    return ids


def test_a_rating_of_10_spelled_1_then_0_is_read_as_10_on_both_remote_engines(tiny_model_dir, judge_constitution, tmp_path):
    """The judge rates 10 (P("1") 0.9, then P("0" | "1") 0.99) or 9 (0.1): 10 gets 0.891, 1 only 0.009, on the exact
    completions read and on the chat top-20 read. A chat backend whose top 20 after "1" lacks "0" says how much it
    could not split (unsplit_mass) rather than passing it off as a read 1."""
    p10, p1, p9 = 0.9 * 0.99, 0.9 * 0.01, 0.1
    expected = 10 * p10 + 1 * p1 + 9 * p9
    ids = _digit_ids(tiny_model_dir)
    for api in ("completions", "chat"):
        with FakeOpenAI(ids=ids) as fake:
            backends = _backends(fake.url, tokenizer=str(tiny_model_dir) if api == "completions" else None, model="fake", backend_api=api)
            with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / f"{api}.log", env=_env(), backends=backends) as server:
                fake.mode = "digits"
                score = _post(server.url, "/v1/score", {"prompt": "Hi", "response": "Hello!"}).json()
                if api == "chat":
                    fake.AFTER_ONE = {"<|im_end|>": -0.01}  # the top 20 after "1" does not show "0"
                    cut = _post(server.url, "/v1/score", {"prompt": "Hi", "response": "Hello!"}).json()
        assert score["rating_probs"][9] == pytest.approx(p10, abs=1e-6), (api, score)
        assert score["rating_probs"][0] == pytest.approx(p1, abs=1e-6), api
        assert score["expected_rating"] == pytest.approx(expected, abs=1e-5), api
        assert score["score"] == pytest.approx((expected - 5.5) / 4.5, abs=1e-5), api  # 0.96; read as "1": -0.82
        assert score["unsplit_mass"] == pytest.approx(0.0, abs=1e-6), api
    assert cut["unsplit_mass"] == pytest.approx(0.9, abs=1e-6) and cut["rating_probs"][0] == pytest.approx(0.9, abs=1e-6)


def test_a_garbage_number_is_scrubbed_and_bounded_in_the_error(tiny_model_dir, judge_constitution, tmp_path):
    """A proxy that puts the request's headers where a log-probability belongs: the 502 names the backend and the fault,
    never the key, and stays short."""
    key = "sk-live-0123456789abcdef"
    with FakeOpenAI() as fake:
        backends = _backends(fake.url, tokenizer=str(tiny_model_dir), model="fake")
        with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / "judge.log", env=_env(CAI_BACKEND_API_KEY=key),
                        backends=backends) as server:
            fake.mode = "garbage_number"
            resp = _post(server.url, "/v1/compare", COMPARE)
    assert resp.status_code == 502, resp.text
    err = resp.json()["error"]
    assert err["type"] == "backend_error" and "not a log-probability" in err["message"] and "backend 1 (http://127.0.0.1:" in err["message"]
    assert "sk-live" not in resp.text and "0123456789abcdef" not in resp.text
    assert len(err["message"]) <= 400, len(err["message"])
    assert key not in (tmp_path / "judge.log").read_text(errors="replace")


def test_a_key_is_not_sent_over_plain_http_beyond_loopback(monkeypatch):
    """A key over http:// to another host is refused at start-up, naming the backend and the flag; loopback, https
    and --backend-allow-http-key are accepted."""
    from cai.errors import CaiError
    from judge_server.openai_engine import start_openai_engine
    from judge_server.settings import ServerSettings

    key = "sk-secret-http-1"
    monkeypatch.setenv("CAI_BACKEND_API_KEY", key)
    with pytest.raises(CaiError) as refused:
        start_openai_engine(ServerSettings(backends=_backends("https://a.example", "http://10.1.2.3:8000", backend_api="chat")))
    message = str(refused.value)
    assert "backend 2 (http://10.1.2.3:8000)" in message and "--backend-allow-http-key" in message and key not in message
    for backends in (_backends("https://a.example", "http://127.0.0.1:9", "http://localhost:9", backend_api="chat"),
                     _backends("http://10.1.2.3:8000", backend_api="chat", backend_allow_http_key=True)):
        asyncio.run(start_openai_engine(ServerSettings(backends=backends)).aclose())
    monkeypatch.delenv("CAI_BACKEND_API_KEY")  # no key: nothing to protect
    asyncio.run(start_openai_engine(ServerSettings(backends=_backends("http://10.1.2.3:8000", backend_api="chat"))).aclose())
    # The server's own command line: a clear error before anything starts, and the flag round-trips through LocalJudge's flags.
    cmd = [sys.executable, "-m", "judge_server", *_backends("http://10.1.2.3:8000", backend_api="chat").command_line()]
    out = subprocess.run(cmd, env={**os.environ, "CAI_BACKEND_API_KEY": key}, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "backend 1 (http://10.1.2.3:8000)" in out.stdout + out.stderr, out.stdout + out.stderr
    assert key not in out.stdout + out.stderr and "Traceback" not in out.stdout + out.stderr
    flags = _backends("http://10.1.2.3:8000", backend_allow_http_key=True).command_line()
    assert "--backend-allow-http-key" in flags and "True" not in flags


def _states(judge_url: str) -> list[dict]:
    return httpx.get(f"{judge_url}/v1/backends", headers={"Authorization": f"Bearer {JUDGE_KEY}"}, timeout=5.0).json()


def test_a_poison_request_does_not_take_a_healthy_fleet_out(tiny_model_dir, judge_constitution, tmp_path):
    """One request that makes every backend answer 500 gets a typed 502 after two backends; asked again (as the client
    retries it), it still takes no backend out, and the other requests are answered."""
    with FakeOpenAI() as one, FakeOpenAI() as two, FakeOpenAI() as three:
        backends = _backends(one.url, two.url, three.url, model="fake", backend_api="chat", backend_check_every=60.0, backend_timeout=5.0)
        with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / "judge.log", env=_env(), backends=backends) as server:
            for fake in (one, two, three):
                fake.poison = "POISON-7c1"
            posts = one.posts + two.posts + three.posts
            for _ in range(4):
                resp = _post(server.url, "/v1/compare", {**COMPARE, "prompt": "POISON-7c1"})
                assert resp.status_code == 502, resp.text
                err = resp.json()["error"]
                assert err["type"] == "backend_error" and "HTTP 500" in err["message"], err
            tried = one.posts + two.posts + three.posts - posts
            for _ in range(4):
                assert _post(server.url, "/v1/compare", COMPARE).status_code == 200
            states = _states(server.url)
    assert all(s["healthy"] and s["failures"] == 0 for s in states), states
    assert tried <= 4 * 2 * 2, tried  # each order of each poison compare was tried on two backends, no more


def test_a_429_is_back_pressure_not_a_failure(tiny_model_dir, judge_constitution, tmp_path):
    """A backend answering 429 stays in: the request goes to another, or waits the Retry-After, and is answered."""
    with FakeOpenAI() as one, FakeOpenAI() as two:
        backends = _backends(one.url, two.url, model="fake", backend_api="chat", backend_check_every=60.0, backend_timeout=10.0)
        with LocalJudge(str(tiny_model_dir), judge_constitution, log_path=tmp_path / "judge.log", env=_env(), backends=backends) as server:
            one.busy_posts = 1000
            for _ in range(4):
                assert _post(server.url, "/v1/compare", COMPARE).status_code == 200
            assert all(s["healthy"] and s["failures"] == 0 for s in _states(server.url)), _states(server.url)
            one.busy_posts = two.busy_posts = 2  # both busy for a moment: wait, not fail
            started = time.monotonic()
            assert _post(server.url, "/v1/compare", COMPARE).status_code == 200
            waited = time.monotonic() - started
            states = _states(server.url)
    assert waited >= 0.9, waited  # Retry-After: 1 was honoured
    assert all(s["healthy"] and s["failures"] == 0 for s in states), states
