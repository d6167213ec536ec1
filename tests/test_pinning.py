"""Run folders resume only under the settings they were started with (`cai.pinning`)."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import BaseModel, Field

from cai.errors import CaiError
from cai.pinning import RunMismatchError, pin_settings


class Section(BaseModel):
    rounds: int = 1
    tokens: int = 64


class Settings(BaseModel):
    out: str
    seed: int = 0
    section: Section = Field(default_factory=Section)


def test_same_settings_resume_and_other_ones_are_refused_with_both_values(tmp_path):
    pin_settings(tmp_path, Settings(out="o"))
    pin_settings(tmp_path, Settings(out="o"))
    with pytest.raises(RunMismatchError, match=r"section\.rounds: was 1, now 2") as e:
        pin_settings(tmp_path, Settings(out="o", section=Section(rounds=2)))
    assert isinstance(e.value, CaiError)


def test_a_setting_added_since_the_run_started_counts_as_its_default(tmp_path):
    pin_settings(tmp_path, Settings(out="o"))
    saved = json.loads((tmp_path / "run.json").read_text())
    del saved["section"]["tokens"], saved["seed"]  # as written by a cai without these settings
    (tmp_path / "run.json").write_text(json.dumps(saved))
    pin_settings(tmp_path, Settings(out="o"))  # resumes: the missing ones are today's defaults
    (tmp_path / "run.json").write_text(json.dumps(saved))
    with pytest.raises(RunMismatchError, match=r"section\.tokens: was 64, now 32"):
        pin_settings(tmp_path, Settings(out="o", section=Section(tokens=32)))


def test_nothing_to_resume_overwrites(tmp_path):
    pin_settings(tmp_path, Settings(out="o"))
    pin_settings(tmp_path, Settings(out="o", seed=3), resuming=False)
    with pytest.raises(RunMismatchError, match="seed: was 3, now 0"):
        pin_settings(tmp_path, Settings(out="o"))


# OUT/config.yaml as a trainer pinned it before every run folder pinned to run.json.
LEGACY_TRAINER_PIN = """\
out: o
seed: 0
section:
  rounds: 1
  tokens: 64
"""


def test_a_trainer_folder_pinned_in_config_yaml_resumes_under_its_settings_only(tmp_path):
    (tmp_path / "config.yaml").write_text(LEGACY_TRAINER_PIN)
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(RunMismatchError, match="seed: was 0, now 1"):
        pin_settings(tmp_path, Settings(out="o", seed=1))
    assert not (tmp_path / "run.json").exists()
    pin_settings(tmp_path, Settings(out="o"))  # resumes, and pins in run.json from now on
    assert json.loads((tmp_path / "run.json").read_text()) == yaml.safe_load(LEGACY_TRAINER_PIN)
    with pytest.raises(RunMismatchError, match=r"section\.rounds: was 1, now 2"):
        pin_settings(tmp_path, Settings(out="o", section=Section(rounds=2)))


def test_a_config_yaml_beside_no_checkpoint_is_not_a_pin(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 5\n")  # e.g. the user's own run config kept in the folder
    pin_settings(tmp_path, Settings(out="o"))
    assert json.loads((tmp_path / "run.json").read_text())["seed"] == 0


def test_a_file_cai_did_not_write_is_named(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunMismatchError, match=r"run.json: not a settings file written by cai"):
        pin_settings(tmp_path, {"seed": 0})


def test_pin_settings_refuses_other_settings(tmp_path):
    pin_settings(tmp_path, {"seed": 0, "policy": "x"})
    pin_settings(tmp_path, {"seed": 0, "policy": "x"})
    with pytest.raises(RunMismatchError, match="seed: was 0, now 1"):
        pin_settings(tmp_path, {"seed": 1, "policy": "x"})
