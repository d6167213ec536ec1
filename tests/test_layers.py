"""The package's layers, checked in a fresh interpreter: the judge service imports only cai's base modules,
and the client side of the judge only its protocol."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_after(*modules: str) -> set[str]:
    code = f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    return {m for m in json.loads(out) if m == "cai" or m.startswith(("cai.", "judge_server"))}


def test_the_judge_service_imports_only_cais_base_modules():
    loaded = loaded_after("judge_server.__main__", "judge_server.app", "judge_server.server", "judge_server.service")
    cai = {m for m in loaded if m.startswith("cai")}
    assert cai <= {"cai", "cai.constitution", "cai.models", "cai.errors", "cai.cli_settings", "cai.config",
                   "cai.server_process"}, sorted(cai)


@pytest.mark.parametrize("client", ["cai.judge_client", "cai.judge", "cai.train.rewards", "cai.evaluate", "cai.generate.sft"])
def test_the_judge_client_side_imports_only_the_protocol(client):
    assert {m for m in loaded_after(client) if m.startswith("judge_server")} <= {"judge_server", "judge_server.protocol"}
