"""A LoRA adapter folded into its base model, for the stages that load one plain model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from cai.errors import ModelResolutionError


def merge_lora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a causal-LM LoRA adapter into its base and save a plain model folder (with the tokenizer).

    Later stages (sampling with vLLM, PPO's starting policy, evaluation) then load one folder.
    Written to a temporary folder and renamed, so an interrupted merge leaves nothing half-written.
    """
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
