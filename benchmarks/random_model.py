"""A random-weight Llama of a real model's shape, saved with a tokenizer: what GPU checks train when no
weights can reach the machine (the arithmetic, memory and speed of a model depend on its shape, not its
weights).

    python benchmarks/random_model.py --shape 1.5b --tokenizer TOKENIZER_DIR --out models/random-1.5b

Shapes: `1.5b` is Qwen2.5-1.5B's body (hidden 1536, 28 layers, 12 query / 2 key-value heads, MLP 8960);
`360m` SmolLM2-360M's; `tiny` two layers of width 128 (a dry run on a CPU). The vocabulary is the
tokenizer's (SmolLM2's 49,152 in the runs so far). Weights are seeded, saved in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}


def build(shape: str, tokenizer_dir: str, out: str, seed: int = 0) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=100_000.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "out": out}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (e.g. a SmolLM2 model folder)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(build(args.shape, args.tokenizer, args.out, args.seed)))
    sys.exit(0)
