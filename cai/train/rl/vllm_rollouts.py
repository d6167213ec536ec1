"""Rollouts with vLLM: the base weights load once; each iteration only the LoRA adapter is synced.

Each iteration the trainer saves its current adapter (a few MB, not the model) to a folder and
vLLM loads it as a new LoRA request, so sampling always uses the policy being trained. vLLM
samples in its own kernels (and, on a GPU, in bfloat16), so the log-probs the update uses are still
computed by the trainer's model from the sampled tokens: the samples come from a policy that
matches the trained one up to kernel precision, as in other vLLM-backed RLHF trainers.

vLLM is started with `generation_config="vllm"`, so nothing in the model's generation_config.json
(a repetition penalty, extra EOS ids) changes what it samples: it stops on exactly the ids the
trainer passes (`cai.models.stop_token_ids`), as transformers' rollouts do, and an answer ends on
the token that was sampled, never on one appended after it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


class VllmRollouts:
    def __init__(self, model_path: str, *, lora_rank: int, max_len: int, seed: int, kv_cache_gib: float = 0.5,
                 gpu_memory_utilization: float = 0.3, log_path: Path | None = None):
        """The engine's own output goes to `log_path` (`cai.engine_logs`; a temp file when None)."""
        from cai.engine_logs import EngineLog
        from cai.vllm_args import vllm_engine_args

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.engine_log = EngineLog(log_path, "rollout engine")
        with self.engine_log.starting():
            from vllm import LLM

            self.llm = LLM(model=model_path, seed=seed, generation_config="vllm", enable_lora=True, max_lora_rank=max(8, lora_rank),
                           max_loras=1, **vllm_engine_args(max_model_len=max_len, cpu_kv_cache_gib=kv_cache_gib,
                                                           gpu_memory_utilization=gpu_memory_utilization))
        self._adapter: Path | None = None

    def generate(self, queries: list[list[int]], adapter_dir: Path | None, iteration: int, *, max_tokens: int, temperature: float,
                 stop_ids: list[int], seed: int) -> list[list[int]]:
        """Sampled response token ids for each query; a response that stopped ends with the stop id it sampled."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(f"ppo-{iteration}", iteration + 1, str(adapter_dir)) if adapter_dir else None
        params = [SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed + i,
                                 stop_token_ids=list(stop_ids), skip_special_tokens=False) for i in range(len(queries))]
        with self.engine_log.reporting("generating"):
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=q) for q in queries], params, lora_request=lora, use_tqdm=False)
        return [list(o.outputs[0].token_ids)[:max_tokens] for o in outs]

    def sync_adapter(self, save, folder: Path, iteration: int) -> Path:
        """Write the current adapter with `save(path)` for vLLM to load; the previous one is removed."""
        path = folder / f"iteration-{iteration}"
        shutil.rmtree(path, ignore_errors=True)
        save(path)
        if self._adapter is not None and self._adapter != path:
            shutil.rmtree(self._adapter, ignore_errors=True)
        self._adapter = path
        return path

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            self.engine_log.close()
