"""Server settings: one pydantic object; `cai judge serve` and `python -m judge_server` make their options from it."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from cai.cli_options import flags_for
from cai.constitution import DEFAULT_CONSTITUTION
from cai.errors import CaiError
from cai.models import DEFAULT_MODEL
from judge_server.protocol import API_KEY_ENV

BACKEND_KEY_ENV = "CAI_BACKEND_API_KEY"
"""Where the judge reads its backends' API key from when no --backend-key-file is given."""


class BackendSettings(BaseModel):
    """Which model answers the judge's requests: its own vLLM engine, or OpenAI-compatible servers already running.

    Keys are never settings (they would land in config files and `ps`): a backend's key comes from
    $CAI_BACKEND_API_KEY or from `backend_key_file`.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["vllm", "openai"] = Field(default="vllm", description="vllm: a vLLM engine in the judge's own process, for "
                                               "--model. openai: OpenAI-compatible servers (vllm serve, SGLang, llama.cpp, "
                                               "a hosted API) at --backend-url.")
    backend_url: list[str] = Field(default_factory=list, description="Base URL of an OpenAI-compatible server (http://host:8000 "
                                   "or http://host:8000/v1); several, comma-separated or repeated, share the load and cover for "
                                   "each other.")
    backend_model: str | None = Field(default=None, description="The model name the backends serve (an id of their /v1/models).")
    backend_tokenizer: str | None = Field(default=None, description="Tokenizer (folder, hub id or embedded name) to apply the "
                                          "chat template with, so prompts go as exact token ids to the completions API. "
                                          "Default: --backend-model when it names a local model.")
    backend_api: Literal["auto", "completions", "chat"] = Field(default="auto", description="completions: exact prompt ids and "
                                                                "option log-probabilities (needs the tokenizer). chat: chat "
                                                                "completions, top-20 log-probabilities (option_mass shows how "
                                                                "much was seen). auto: completions when the tokenizer is known.")
    backend_key_file: Path | None = Field(default=None, description="File holding the backends' API key: one line for all, or "
                                          f"one line per --backend-url in order. Default: ${BACKEND_KEY_ENV}, else no key.")
    backend_allow_http_key: bool = Field(default=False, description="Send the backends' API key over plain http:// to hosts "
                                         "beyond loopback (a trusted private network). Default: refused at start-up; use https://.")
    backend_timeout: float = Field(default=120.0, gt=0, description="Seconds to wait for a backend's answer; past it the "
                                   "backend is taken out and the request goes to another.")
    backend_check_every: float = Field(default=5.0, gt=0, description="Seconds between health checks of each backend; one "
                                       "taken out comes back when it passes one.")

    @field_validator("backend_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        return checked_server_urls(urls, "backend", BACKEND_KEY_ENV)

    @model_validator(mode="after")
    def _check(self) -> BackendSettings:
        if self.backend == "openai" and (not self.backend_url or not self.backend_model):
            raise ValueError("backend openai needs --backend-url (one or more) and --backend-model")
        if self.backend == "vllm" and self.backend_url:
            raise ValueError("--backend-url is for --backend openai; the vllm backend runs in the judge's own process")
        return self

    def command_line(self) -> list[str]:
        """These settings as `cai judge serve` / `python -m judge_server` flags (nothing for the default in-process engine)."""
        return flags_for(self) if self.backend != "vllm" else []


def checked_server_urls(urls: list[str], flag: str, key_env: str) -> list[str]:
    """OpenAI-compatible servers' base URLs (the judge's --backend-url, the policy's --policy-url), trimmed: http(s), a
    host, no credentials, query or fragment, none twice. `flag` and `key_env` name the options an error points to."""
    out = []
    for url in urls:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{flag} URL {url!r} is not http(s)://host[:port][/v1]")
        if parts.username or parts.password:
            raise ValueError(f"a {flag} URL must not carry credentials; put the key in --{flag}-key-file or ${key_env}")
        if parts.query or parts.fragment:
            raise ValueError(f"{flag} URL {parts.scheme}://{parts.netloc}{parts.path} must not carry a query or fragment")
        out.append(url.strip().rstrip("/"))
    if len(set(out)) != len(out):
        raise ValueError(f"a {flag} URL is given twice")
    return out


class InsecureBindError(CaiError, ValueError):
    """Binding beyond loopback without an API key."""


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default=DEFAULT_MODEL, description="Judge model of the in-process vLLM engine: folder, hub id or embedded "
                       "name (with --backend openai, see --backend-model).")
    constitution: str = Field(default=DEFAULT_CONSTITUTION, description="Constitution YAML file or shipped name; edits are "
                              "picked up without a restart.")
    host: str = Field(default="127.0.0.1", description="Bind address. Anything but loopback needs an API key.")
    port: int = Field(default=8321, ge=0, le=65535, description="TCP port.")
    api_key: SecretStr | None = Field(default=None, description="Bearer key clients must send; required to bind beyond loopback "
                                      f"(prefer ${API_KEY_ENV}: flags show in ps).", json_schema_extra={"envvar": API_KEY_ENV})
    max_body_bytes: int = Field(default=2_000_000, ge=1024, description="Larger request bodies get 413.")
    max_prompt_tokens: int = Field(default=1536, ge=16, description="Judge prompts longer than this get 422.")
    max_new_tokens: int = Field(default=512, ge=1, description="Cap on any request's generation length.")
    max_queue: int = Field(default=512, ge=1, description="Work items in flight before new requests get 429.")
    max_model_len: int = Field(default=2048, ge=64, description="vLLM context length.")
    dtype: str = Field(default="auto", description="auto: float32 on CPU, bfloat16 on GPU.")
    kv_cache_gib: float | None = Field(default=None, gt=0, le=1024,
                                       description="KV cache size. Default: 1 GiB on CPU; on GPU, 85% of GPU memory minus the model.")
    seed: int = Field(default=0, description="vLLM engine seed.")
    prefix_caching: bool = Field(default=True, description="vLLM prefix caching: a pair's two orders and the pairs of one prompt "
                                 "share their beginnings, computed once.")
    block_size: int | None = Field(default=None, ge=16, le=256, multiple_of=16, description="KV cache block size in tokens, the "
                                   "prefix cache's granularity (default: 32 on a CPU, where vLLM's 128 misses "
                                   "most of what a pair's two orders share; vLLM's 16 on a GPU).")
    backends: BackendSettings = Field(default_factory=BackendSettings, description="The model behind the judge.")

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.max_prompt_tokens + 16 > self.max_model_len:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must leave room in max_model_len ({self.max_model_len})")
        return self

    def check_bind(self) -> None:
        if not is_loopback(self.host) and self.api_key is None:
            raise InsecureBindError(
                f"refusing to bind {self.host}: beyond loopback the judge needs an API key "
                f"(--api-key, or ${API_KEY_ENV}); or bind 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere
