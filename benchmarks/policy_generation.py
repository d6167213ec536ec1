"""Policy sampling: transformers batched generate (what `cai generate` uses) vs vLLM offline, as JSON.

The same chat prompts (MT-Bench first turns), the same number of new tokens, greedy, in one run.
Tokens per second count generated tokens only. vLLM's engine start is reported apart.

    .venv/bin/python benchmarks/policy_generation.py --model smollm2-135m-instruct --prompts 16 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="transformers batch size")
    args = ap.parse_args()

    from cai.models import resolve_model
    from cai.policy import Policy
    from cai.prompts import load_prompts
    from cai.samples import SamplingConfig
    from cai.vllm_args import use_all_cpu_cores_for_vllm

    prompts = [p.text for p in load_prompts("mtbench", limit=args.prompts)]
    path = resolve_model(args.model).path

    # min_new_tokens = max_new_tokens: both sides generate exactly the same number of tokens.
    policy = Policy(args.model, batch_size=args.batch_size)
    policy.sample(prompts[:2], n=1, config=SamplingConfig(max_new_tokens=4, temperature=0.0), seed=0)  # warm
    policy.model.generation_config.min_new_tokens = args.tokens
    started = time.perf_counter()
    hf = policy.sample(prompts, n=1, config=SamplingConfig(max_new_tokens=args.tokens, temperature=0.0), seed=0)
    hf_seconds = time.perf_counter() - started
    hf_tokens = sum(s[0].tokens for s in hf)
    del policy

    use_all_cpu_cores_for_vllm()  # as the judge and cai.policy do
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=path, dtype="float32", max_model_len=2048, enforce_eager=True, kv_cache_memory_bytes=2**30, seed=0)
    start_seconds = time.perf_counter() - started
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    params = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens, temperature=0.0)
    llm.generate(texts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm
    started = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=False)
    vllm_seconds = time.perf_counter() - started
    vllm_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    hf_rate, vllm_rate = hf_tokens / hf_seconds, vllm_tokens / vllm_seconds
    print(json.dumps({
        "benchmark": "policy_generation", "model": args.model, "prompts": len(prompts), "new_tokens_each": args.tokens,
        "transformers_batched": {"batch_size": args.batch_size, "seconds": round(hf_seconds, 2), "tokens": hf_tokens,
                                 "tokens_per_s": round(hf_rate, 1)},
        "vllm_offline": {"seconds": round(vllm_seconds, 2), "tokens": vllm_tokens, "tokens_per_s": round(vllm_rate, 1),
                         "engine_start_s": round(start_seconds, 1)},
        "vllm_over_transformers": round(vllm_rate / hf_rate, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
