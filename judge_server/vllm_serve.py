"""Start vLLM's own OpenAI-compatible server (what `vllm serve` runs) for a local model on loopback.

A backend for `--backend openai` on this machine: the tests start one to stand for the server a team
already runs, the backend benchmark measures against one. The engine flags are those of every cai
vLLM engine (`cai.vllm_args.vllm_engine_args`: float32, eager mode and a fixed KV cache on a CPU).

    with VLLMServer("/path/to/model", served_name="judge") as server:
        ... server.url ...

The key for `--api-key` is passed through the environment (VLLM_API_KEY), never on the command line.
`lora_modules={"name": adapter_dir}` also serves peft adapters by name, as
`vllm serve MODEL --enable-lora --max-lora-rank R --lora-modules name=DIR` does (R: the adapters' largest
rank, rounded up to one vLLM accepts; each module given in the flag's JSON form, which a comma in DIR
cannot break).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cai.server_process import ServerProcess

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks `--max-lora-rank` accepts (vLLM 0.32's `vllm.config.lora.MaxLoRARanks`)."""


class VLLMServeError(RuntimeError):
    pass


def max_lora_rank(adapters: list[Path]) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds every adapter's rank (its adapter_config.json's `r`)."""
    ranks = []
    for folder in adapters:
        try:
            ranks.append(int(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["r"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VLLMServeError(f"{folder / 'adapter_config.json'}: not a peft LoRA adapter's config "
                                 f"({type(e).__name__}: {e})") from None
    rank = max(ranks)
    if rank > LORA_RANKS[-1]:
        raise VLLMServeError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")
    return next(r for r in LORA_RANKS if r >= rank)


class VLLMServer(ServerProcess):
    what = "vllm serve"
    error = VLLMServeError

    def __init__(self, model: str | Path, *, served_name: str | None = None, port: int | None = None, api_key: str | None = None,
                 max_model_len: int = 2048, kv_cache_gib: float = 0.5, log_path: str | Path | None = None,
                 start_timeout: float = 600.0, lora_modules: dict[str, str | Path] | None = None):
        super().__init__(port=port, log_path=log_path, start_timeout=start_timeout, log_prefix="vllm-serve-")
        self.model = str(model)
        self.served_name = served_name or self.model
        self.api_key = api_key
        self.max_model_len, self.kv_cache_gib = max_model_len, kv_cache_gib
        self.lora_modules = {name: Path(folder).resolve() for name, folder in (lora_modules or {}).items()}

    def command(self) -> list[str]:
        from cai.vllm_args import vllm_engine_args

        args = vllm_engine_args(max_model_len=self.max_model_len, gpu_memory_utilization=0.85, kv_cache_gib=self.kv_cache_gib)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--served-model-name",
               self.served_name, "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0"]
        for key, value in args.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                cmd.append(flag if value else f"--no-{key.replace('_', '-')}")
            else:
                cmd += [flag, str(value)]
        if self.lora_modules:
            cmd += ["--enable-lora", "--max-loras", str(len(self.lora_modules)),
                    "--max-lora-rank", str(max_lora_rank(list(self.lora_modules.values()))),
                    "--lora-modules", *(json.dumps({"name": n, "path": str(p)}) for n, p in self.lora_modules.items())]
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)  # after command(): vllm_engine_args may set vLLM's CPU variables here
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env
