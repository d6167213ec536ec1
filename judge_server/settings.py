"""Server settings: one pydantic object, built from `cai judge serve` flags or by tests."""

from __future__ import annotations

import ipaddress
import os

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from cai.errors import CaiError

API_KEY_ENV = "CAI_JUDGE_API_KEY"


class InsecureBindError(CaiError, ValueError):
    """Binding beyond loopback without an API key."""


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model name for cai.models.resolve_model (folder, hub id or embedded name).")
    constitution: str = Field(description="Path of the constitution YAML; edits are picked up without a restart.")
    host: str = "127.0.0.1"
    port: int = Field(default=8321, ge=0, le=65535)
    api_key: SecretStr | None = Field(default=None, description="Bearer key; required to bind beyond loopback.")
    max_body_bytes: int = Field(default=2_000_000, ge=1024, description="Larger request bodies get 413.")
    max_prompt_tokens: int = Field(default=1536, ge=16, description="Judge prompts longer than this get 422.")
    max_new_tokens: int = Field(default=512, ge=1, description="Cap on any request's generation length.")
    max_queue: int = Field(default=512, ge=1, description="Work items in flight before new requests get 429.")
    max_model_len: int = Field(default=2048, ge=64)
    dtype: str = Field(default="auto", description="auto: float32 on CPU, bfloat16 on GPU.")
    kv_cache_gib: float | None = Field(default=None, gt=0, le=1024,
                                       description="KV cache size. Default: 1 GiB on CPU; on GPU, 85% of GPU memory minus the model.")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.max_prompt_tokens + 16 > self.max_model_len:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must leave room in max_model_len ({self.max_model_len})")
        return self

    @classmethod
    def with_env_key(cls, **kwargs) -> ServerSettings:
        """Settings whose API key falls back to $CAI_JUDGE_API_KEY (keeps the key out of `ps`)."""
        if kwargs.get("api_key") is None and os.environ.get(API_KEY_ENV):
            kwargs["api_key"] = os.environ[API_KEY_ENV]
        return cls(**kwargs)

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
