"""Server settings: one pydantic object; `cai judge serve` and `python -m judge_server` make their options from it."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from cai.errors import CaiError
from cai.models import DEFAULT_MODEL
from judge_server.protocol import API_KEY_ENV



class InsecureBindError(CaiError, ValueError):
    """Binding beyond loopback without an API key."""


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default=DEFAULT_MODEL, description="Judge model: folder, hub id or embedded name.")
    constitution: str = Field(default="harmless-helpful", description="Constitution YAML file or shipped name; edits are "
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
