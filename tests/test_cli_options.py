"""Settings to flags and back: `flags_for` spells settings as the options `settings_command` makes, so the flags
a job starts a judge with parse back, through `cai judge serve`, into the settings the job had."""

from __future__ import annotations

import pytest
import typer
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from cai.cli import app
from cai.cli_options import flags_for, settings_command
from judge_server.protocol import API_KEY_ENV
from judge_server.settings import BackendSettings, ServerSettings


@pytest.fixture
def judge_serve(monkeypatch):
    """`cai judge serve FLAGS`, answering with the settings it would serve instead of serving them."""
    import judge_server.server

    seen: list[ServerSettings] = []
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setattr(judge_server.server, "serve", seen.append)

    def invoke(*flags: str) -> ServerSettings:
        result = CliRunner().invoke(app, ["judge", "serve", *flags])
        assert result.exit_code == 0, result.output
        return seen.pop()

    return invoke


def test_backend_settings_round_trip_through_the_judge_serve_command(judge_serve, tmp_path):
    backends = BackendSettings(backend="openai", backend_url=["http://gpu1:8000", "https://gpu2.example/v1"], backend_model="judge",
                               backend_tokenizer="smollm2-135m-instruct", backend_api="chat", backend_key_file=tmp_path / "keys",
                               backend_allow_http_key=True, backend_timeout=7.5, backend_check_every=0.25)
    assert judge_serve(*backends.command_line()).backends == backends
    assert judge_serve(*backends.model_copy(update={"backend_allow_http_key": False}).command_line()).backends.backend_allow_http_key is False


def test_server_settings_round_trip_with_nested_settings_and_switches_off(judge_serve):
    settings = ServerSettings(model="tiny", constitution="c.yaml", host="localhost", port=9001, max_body_bytes=4096,
                              max_prompt_tokens=100, max_new_tokens=8, max_queue=3, max_model_len=256, dtype="float32",
                              kv_cache_gib=0.5, seed=7, prefix_caching=False, block_size=64,
                              backends=BackendSettings(backend="openai", backend_url=["http://a:1"], backend_model="m"))
    flags = flags_for(settings)
    assert "--no-prefix-caching" in flags and "--backend-url" in flags
    assert judge_serve(*flags) == settings


def test_secrets_and_unset_fields_are_left_out_and_custom_switches_kept():
    class Job(BaseModel):
        model_config = ConfigDict(extra="forbid")

        out: str
        lora: bool = Field(default=True, json_schema_extra={"cli": "--lora/--full"})
        limit: int | None = None
        names: list[str] = Field(default_factory=list)

    assert "hunter2" not in flags_for(ServerSettings(api_key="hunter2"))  # read from $CAI_JUDGE_API_KEY, never seen in ps
    job = Job(out="o", lora=False)
    assert flags_for(job) == ["--out", "o", "--full"]
    seen = []
    cli = typer.Typer()
    cli.command()(settings_command(Job, seen.append))
    assert CliRunner().invoke(cli, flags_for(job)).exit_code == 0 and seen == [job]
