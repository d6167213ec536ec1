"""The policy of online RL: the starting model with a fresh LoRA adapter and, for PPO, a value head; how it is loaded.

The reference is the same weights with the adapter disabled, so no second copy is held; the value
head (one linear layer) reads the policy's last hidden state, so the critic shares its forward pass.
Algorithms without a critic (GRPO, RLOO, online DPO) load the policy without one.
"""

from __future__ import annotations

import math

import torch

from cai.train.rl.settings import RLJob


class Policy(torch.nn.Module):
    """A causal LM (with its LoRA adapter) and, when `hidden_size` is given, a value head on its last hidden state."""

    def __init__(self, lm: torch.nn.Module, hidden_size: int | None):
        super().__init__()
        self.lm = lm
        self.value_head: torch.nn.Linear | None = None
        if hidden_size is not None:
            self.value_head = torch.nn.Linear(hidden_size, 1)
            torch.nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden_size + 1))
            torch.nn.init.zeros_(self.value_head.bias)

    # What accelerate's FSDP reads to give each decoder layer, the embeddings and the final norm + LM head
    # their own units; without them the whole policy was one unit, gathered whole for every forward.
    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.lm, "_no_split_modules", None)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query + response (B, Tq + R) -> logits (B, R, V) and values (B, R) at the positions that predict the response
        (values None without a value head).

        Only those R positions go through the LM head: the query's logits would be thrown away,
        and with a 49k vocabulary the head is a fifth of a small model's arithmetic per token.
        They are passed as an index tensor, so the head reads a contiguous copy of those hidden
        states: on a strided slice the CPU matmul takes a slower path (1.6x for SmolLM2's head).
        """
        # Queries are left-padded: positions count real tokens only, as in generation.
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        width = input_ids.shape[1]
        keep = torch.arange(width - response_length - 1, width - 1, device=input_ids.device)  # (R,)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=self.value_head is not None, logits_to_keep=keep, use_cache=False)
        if self.value_head is None:
            return out.logits, None
        hidden = out.hidden_states[-1][:, keep]  # (B, R, H)
        return out.logits, self.value_head(hidden).squeeze(-1).float()


def load_policy(cfg: RLJob, device: torch.device, value_head: bool = True) -> tuple[Policy, object]:
    """(policy, tokenizer) for `cfg.model`: LoRA and the value head (when `value_head`) initialised from `cfg.seed`,
    on `device`, in eval mode: dropout stays off in every pass, sampling and update alike (as in TRL and
    summarize_from_feedback); with it on in the update only, pi/pi_old != 1 before any step."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from cai.models import load_tokenizer, resolve_model
    from cai.train.precision import base_dtype, trainable_in_fp32

    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices and the value head start from the seed
    # The base is frozen (and also the reference): bf16 under bf16 autocast; adapter and value head float32.
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype(cfg.precision, device, frozen=True))
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    policy = Policy(get_peft_model(lm, cfg.peft_config("CAUSAL_LM")), lm.config.hidden_size if value_head else None)
    policy = trainable_in_fp32(policy).to(device)
    if cfg.gradient_checkpointing:
        from cai.train.recompute import recompute_layers

        recompute_layers(policy)
    policy.eval()
    return policy, tokenizer
