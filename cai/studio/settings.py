"""Settings of `cai studio` (its command-line options are made from these fields)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from cai.errors import CaiError
from cai.generate.common import PolicyBackend
from cai.judge import JudgeConnection
from cai.models import DEFAULT_MODEL

API_KEY_ENV = "CAI_STUDIO_API_KEY"
"""Where `cai studio` reads the key that lets it bind beyond loopback, so it stays out of command lines."""


class InsecureBindError(CaiError, ValueError):
    """Binding the studio beyond loopback without an API key."""


class StudioSettings(JudgeConnection):
    """Settings of one `cai studio` session."""

    constitution: Path = Field(description="The constitution file to edit (.yaml, or .txt/.md with one principle per paragraph); "
                               "the only file the studio writes.")
    judge_model: str = Field(default=DEFAULT_MODEL, description="Model of the judge started here on the constitution file "
                             "(without --judge-url).")
    pairs: str = Field(default="hh-harmless", description="Human-labelled pairs for the against-people panel: a .jsonl file "
                       "(prompt/chosen/rejected, optional p_chosen) or hh-harmless (48 shipped HH-RLHF pairs).")
    limit: int = Field(default=48, ge=1, description="Use at most this many pairs (seeded order); each is judged under every "
                       "principle, in both orders.")
    seed: int = Field(default=0, ge=0, description="Seeds the pair order, the A/B placement and the intervals (as `cai judge eval`).")
    judge_cache: Path | None = Field(default=None, description="The judge answer cache (default ~/.cache/cai/judge-cache.sqlite).")
    max_tokens: int = Field(default=256, ge=1, le=4096, description="Tokens a critique or revision in the try-it panel may take; "
                            "in the data preview, a cap on the policy answer, critique and revision (below `cai generate sft`'s "
                            "defaults it is the preview's size).")
    host: str = Field(default="127.0.0.1", description="Bind address. Anything but loopback needs an API key.")
    port: int = Field(default=8765, ge=0, le=65535, description="TCP port of the page.")
    api_key: SecretStr | None = Field(default=None, description=f"Key the page must be opened with (URL ?key=...); required "
                                      f"to bind beyond loopback (prefer ${API_KEY_ENV}: flags show in ps).",
                                      json_schema_extra={"envvar": API_KEY_ENV})
    max_body_bytes: int = Field(default=1_100_000, ge=1024, description="Larger request bodies (a huge paste) get 413.")
    preview_prompts: str = Field(default="donotanswer", description="Where the data preview takes its prompts when none are "
                                 "typed (a `cai generate sft --prompts` source; seeded as its --limit takes them).")
    preview_policy: str | None = Field(default=None, description="The policy whose first answers the data preview critiques and "
                                       "revises (default: the judge's model, as in the demo).")
    preview_backend: PolicyBackend = Field(default="transformers", description="How the data preview samples the policy: "
                                           "transformers starts in about a second; vLLM takes 30-40 s, and its answers differ "
                                           "under the same seed.")

    def check_bind(self) -> None:
        from judge_server.settings import is_loopback

        if not is_loopback(self.host) and self.api_key is None:
            raise InsecureBindError(f"refusing to bind {self.host}: beyond loopback the studio needs an API key "
                                    f"(--api-key, or ${API_KEY_ENV}); or bind 127.0.0.1")
