"""The policy on OpenAI-compatible servers (`--policy-backend openai`): `vllm serve` replicas, or any server of that API.

    vllm serve MODEL --served-model-name policy --port 8000        # on each GPU machine
    cai generate sft --prompts red-team --out runs/sft --policy-backend openai \
        --policy-url http://gpu1:8000 --policy-url http://gpu2:8000 --policy-model policy

The requests go through the judge's `BackendPool` (`judge_server.backends`): each to the healthy server
with the fewest in flight, failover when one stops answering, health checks that bring it back, one key
per server (from --policy-key-file or $CAI_POLICY_API_KEY, never logged). A LoRA adapter the servers
serve (`vllm serve BASE --enable-lora --lora-modules NAME=DIR`) is sampled by its NAME.

Chat completions, not completions: the server applies the chat template of the model (or adapter) it
serves, so nothing of the model is needed here (a served name need not resolve on this machine), and the
prompt is the one the in-process backends render (`apply_chat_template(..., add_generation_prompt=True)`).
The server stops at the model's EOS (its generation config's stop ids, as the local backends do) or at
`max_tokens`.

Seeds: each sample is its own request carrying the seed of (run seed, prompt, sample index), so a sample
does not depend on which server answers, on the chunk it was in or on what else was in flight. vLLM's
server honours `seed`: the same seeds give the same rows from run to run (not the rows of the offline
engine, which seeds per prompt). A server that ignores `seed` (OpenAI's own API, many hosted ones) gives
other samples each run, and a resumed run's new rows are not those an uninterrupted run would have made.

A request the servers answer with an error or garbage (not JSON, no message, an unknown finish reason, no
token count) becomes a `Sample` with `error` set: the generators log that prompt's row as failed and a rerun
retries it. When no server answers any request of a batch, `PolicyServersDownError` stops the job (a
rerun resumes it) rather than failing every row after a wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai.errors import CaiError
from cai.samples import Sample, SamplingConfig, sample_seed

if TYPE_CHECKING:
    from judge_server.backends import Backend

logger = logging.getLogger(__name__)

POLICY_KEY_ENV = "CAI_POLICY_API_KEY"
"""Where the policy's servers' API key is read from when no --policy-key-file is given."""
CHAT = "/v1/chat/completions"


class PolicyServers(BaseModel):
    """Where `--policy-backend openai` samples: OpenAI-compatible servers (the judge's `BackendSettings`, for the policy).
    Keys are never settings (they would land in run.json and `ps`)."""

    model_config = ConfigDict(extra="forbid")

    policy_url: list[str] = Field(default_factory=list, description="With --policy-backend openai: base URL of an "
                                  "OpenAI-compatible server (http://host:8000 or http://host:8000/v1) serving the policy; "
                                  "several, comma-separated or repeated, share the load and cover for each other.")
    policy_model: str | None = Field(default=None, description="With --policy-backend openai: the name the servers serve the "
                                     "policy (or its LoRA adapter) under, an id of their /v1/models. Default: --policy.")
    policy_key_file: Path | None = Field(default=None, description="File holding the policy servers' API key: one line for "
                                         f"all, or one per --policy-url in order. Default: ${POLICY_KEY_ENV}, else no key.")
    policy_allow_http_key: bool = Field(default=False, description="Send the policy servers' API key over plain http:// to "
                                        "hosts beyond loopback (a trusted private network). Default: refused; use https://.")
    policy_timeout: float = Field(default=300.0, gt=0, description="Seconds to wait for a policy server's answer; past it the "
                                  "server is taken out and the request goes to another.")
    policy_check_every: float = Field(default=5.0, gt=0, description="Seconds between health checks of each policy server.")
    policy_concurrency: int = Field(default=64, ge=1, description="Policy requests in flight at once, over all servers "
                                    "(one request per sample).")

    @field_validator("policy_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        from judge_server.settings import checked_server_urls

        return checked_server_urls(urls, "policy", POLICY_KEY_ENV)

    def check_backend(self, backend: str) -> None:
        """Refuse servers without `--policy-backend openai`, and that backend without servers (a settings model's validator)."""
        if backend == "openai" and not self.policy_url:
            raise ValueError("--policy-backend openai needs --policy-url (one or more OpenAI-compatible servers)")
        if backend != "openai" and self.policy_url:
            raise ValueError(f"--policy-url is for --policy-backend openai; the {backend} backend samples in this process")


class PolicyServersDownError(CaiError, RuntimeError):
    """No policy server can be used: none answered (at the start, or any request of a batch: what was finished is kept
    and a rerun resumes), or one refused the key."""


class PolicySamplingError(CaiError, RuntimeError):
    """Answers a job cannot do without (`cai eval`'s) failed on the policy servers."""


class ServedModelError(CaiError, ValueError):
    """The policy servers do not serve the model name the job asks for."""


class ServerPolicy:
    """`Policy.sample` over OpenAI-compatible servers: an event loop on a thread of its own (the generators call
    `sample` from inside theirs), one `BackendPool` for the whole job."""

    def __init__(self, model_name: str, servers: PolicyServers):
        # the judge's pool is imported here, not at the top: the settings and errors above are all that the commands
        # that merely take these flags (cai eval, cai generate) load, and the client side of the judge loads only its
        # protocol (tests/test_layers.py)
        from judge_server.backends import BackendPool, backend_keys, check_key_transport

        keys = backend_keys(servers.policy_url, servers.policy_key_file, POLICY_KEY_ENV, "policy")
        check_key_transport(servers.policy_url, keys, servers.policy_allow_http_key, "policy")
        self.name = model_name
        self.concurrency = servers.policy_concurrency
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cai-policy-servers", daemon=True)
        self._thread.start()
        self.pool = BackendPool(servers.policy_url, keys, timeout=servers.policy_timeout, check_every=servers.policy_check_every,
                                flag="policy", key_env=POLICY_KEY_ENV)
        try:
            self._run(self._check_served())
        except BaseException:
            self.close()
            raise
        logger.info("policy: %s on %d server(s)", model_name, len(self.pool.backends))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _check_served(self) -> None:
        """Each server that answers /v1/models must list the model; one that does not answer is left to the health checks."""
        answered = []
        for b in self.pool.backends:
            try:
                resp = await b.client.get("/v1/models", timeout=min(10.0, self.pool.timeout))
                ids = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)] if resp.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError) as e:  # down for now, or not the API: left to the health checks
                logger.warning("%s: /v1/models not answered (%s)", b.name, type(e).__name__)
                continue
            if resp.status_code in (401, 403):
                raise PolicyServersDownError(f"{b.name} refused the API key ({self.pool.key_hint})")
            if ids is None:
                logger.warning("%s: /v1/models answered HTTP %d", b.name, resp.status_code)
                continue
            if self.name not in ids:
                raise ServedModelError(f"{b.name} serves {ids}, not {self.name!r}: give --policy-model one of those names "
                                       "(vllm serve's --served-model-name, or a LoRA adapter's name in --lora-modules)")
            answered.append(b)
        if not answered:
            raise PolicyServersDownError(f"no policy server answered /v1/models ({', '.join(b.name for b in self.pool.backends)}): "
                                         "check that they are up and that the key is right")

    def sample(self, prompts: list[str], *, n: int, config: SamplingConfig, seed: int | str,
               on_batch: Callable[[int], None] | None = None) -> list[list[Sample]]:
        """As `Policy.sample`; `on_batch(1)` is called as each prompt's n samples are in. A failed request is a Sample
        with `error` set (finish_reason "error")."""
        out, down = self._run(self._sample_all(prompts, n, config, seed, on_batch))
        errors = [s.error for group in out for s in group if s.error is not None]
        if down and down == n * len(prompts):
            raise PolicyServersDownError(f"{errors[0]}; the rows finished so far are kept: rerun the same command to resume")
        if errors:
            logger.warning("policy: %d of %d samples failed on the servers, e.g. %s", len(errors), n * len(prompts), errors[0])
        return out

    async def _sample_all(self, prompts, n, config, seed, on_batch) -> tuple[list[list[Sample]], int]:
        """The samples, and how many found no server to answer them."""
        from judge_server.backends import BackendError, BackendUnavailableError

        slots = asyncio.Semaphore(self.concurrency)
        down = 0

        async def one(prompt: str, j: int) -> Sample:
            nonlocal down
            async with slots:
                try:
                    return await self._request(prompt, config, sample_seed(seed, prompt, j))
                except (BackendError, BackendUnavailableError) as e:
                    down += isinstance(e, BackendUnavailableError)
                    return Sample(text="", finish_reason="error", tokens=0, error=str(e))

        async def group(prompt: str) -> list[Sample]:
            samples = await asyncio.gather(*(one(prompt, j) for j in range(n)))
            if on_batch is not None:
                on_batch(1)
            return list(samples)

        return list(await asyncio.gather(*(group(p) for p in prompts))), down

    async def _request(self, prompt: str, config: SamplingConfig, seed: int) -> Sample:
        body = {"model": self.name, "messages": [{"role": "user", "content": prompt}], "max_tokens": config.max_new_tokens,
                "temperature": config.temperature, "top_p": config.top_p if config.temperature > 0 else 1.0, "seed": seed}
        backend, doc = await self.pool.post(CHAT, body)
        return _sample(backend, doc, config.max_new_tokens)

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self.pool.aclose())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                self._loop.close()


def _sample(backend: Backend, doc: dict, max_tokens: int) -> Sample:
    """The answer's one choice as a Sample, or a BackendError saying what is wrong with it."""
    from judge_server.backends import BackendError

    choices = doc.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise BackendError(backend.name, f"answer of {CHAT} has no message content")
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise BackendError(backend.name, f"answer of {CHAT} finished with {finish!r}, not 'stop' (EOS) or 'length'")
    usage = doc.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= max_tokens:
        raise BackendError(backend.name, f"answer of {CHAT} counts {tokens!r} completion tokens (asked for at most {max_tokens})")
    return Sample(text=text.strip(), finish_reason=finish, tokens=tokens)
