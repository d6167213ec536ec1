"""Shared fixtures: one tiny model per test session, built locally with random weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
