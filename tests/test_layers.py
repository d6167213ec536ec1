"""The package's layers, checked in a fresh interpreter: the judge service (every module of `judge_server/`)
imports only cai's base modules; the client side of the judge only its protocol; the side that starts a judge
from a config also its settings (to write the judge's command line), never its engine, app or service."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import judge_server

SERVICE_MODULES = ["judge_server", *(f"judge_server.{m.name}" for m in pkgutil.iter_modules(judge_server.__path__))]
CAI_BASE_MODULES = {"cai", "cai.constitution", "cai.constitution.model", "cai.constitution.text", "cai.constitution.files", "cai.models", "cai.embedded", "cai.vllm_args", "cai.errors", "cai.cli_options", "cai.settings_file", "cai.server_process", "cai.files"}


def loaded_after(*modules: str) -> set[str]:
    code = f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    return {m for m in json.loads(out) if m == "cai" or m.startswith(("cai.", "judge_server"))}


def test_the_judge_service_imports_only_cais_base_modules():
    assert {"judge_server.__main__", "judge_server.app", "judge_server.server", "judge_server.service"} <= set(SERVICE_MODULES)
    loaded = loaded_after(*SERVICE_MODULES)
    assert {m for m in loaded if m.startswith("cai")} <= CAI_BASE_MODULES, sorted(loaded)


@pytest.mark.parametrize("client", [
    "cai.judge_client", "cai.judge_launcher", "cai.judge", "cai.train.rewards", "cai.evaluate", "cai.generate.sft",
])
def test_the_judge_client_side_imports_only_the_protocol(client):
    assert {m for m in loaded_after(client) if m.startswith("judge_server")} <= {"judge_server", "judge_server.protocol"}


@pytest.mark.parametrize("starter", ["cai.run_config", "cai.pipeline"])
def test_what_starts_a_judge_from_a_config_imports_its_settings_not_its_engine(starter):
    """`cai run`'s judge.backends is the service's own BackendSettings, written back as flags (`flags_for`)."""
    loaded = {m for m in loaded_after(starter) if m.startswith("judge_server")}
    assert loaded <= {"judge_server", "judge_server.protocol", "judge_server.settings"}, sorted(loaded)
