"""Baseline: TRL's PPO trainer (`trl.experimental.ppo.PPOTrainer`) timed per iteration, as one JSON object.

Run by `benchmarks/ppo_throughput.py` as a subprocess, next to cai's own PPO, with the same knobs:

    .venv/bin/python benchmarks/_trl_ppo.py --policy MODEL_DIR [--reward-model RM_DIR] --batch-size 8 \
        --mini-batches 2 --response-length 32 --ppo-epochs 1 --iterations 4 --lora --seed 0 [--prompts FILE.jsonl]

One iteration is TRL's `update`: rollout of `--batch-size` prompts, reference log-probs, values, reward,
GAE, then `--ppo-epochs` passes over `--mini-batches` minibatches (one optimiser step per minibatch).

Timing: TRL's loop calls no `on_step_begin`; it calls `on_train_begin` once before the loop and
`on_step_end` once at the end of every update (after its metrics/logging and lr-scheduler step). An
iteration's seconds are the time between consecutive of those callbacks (the first from
`on_train_begin`), so they also hold the previous update's trailing `gc.collect()`/`empty_cache()`.
The first iteration is dropped as warm-up.

Tokens (`token_count: "actual"`): a forward pre-hook on the reward model's backbone sums the
attention mask TRL builds for the scoring pass, i.e. the non-pad query tokens plus each response up
to and including its first EOS (all `--response-length` tokens when there is none).

Memory: `rss_after_load_mib` is the resident set just before `trainer.train()` (models, reference
copy, optimiser object built; every weight read once first, since transformers memory-maps the
checkpoint and untouched weights are not yet resident); `peak_rss_mib` is `ru_maxrss` at the end of the last
update (`on_step_end`), as `_cai_ppo.py` takes it when its last iteration returns (`peak_rss_process_mib` is
`ru_maxrss` at the very end); on CUDA also `torch.cuda.max_memory_allocated()`.

All logs go to stderr (stdout is redirected at the file-descriptor level while TRL runs, since TRL
and transformers print to stdout); the JSON object is the only thing written to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ppo_common import (add_common_args, check_common_args, common_result, hf_trainer_args, iteration_timer,  # noqa: E402
                         load_prompt_texts, main, make_reward_model, resident_after_reading)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, policy_help="local causal-LM folder",
                    reward_help="local sequence-classification folder (num_labels=1); default: one made from --policy "
                                "with a seeded score head, used for both the reward and the value model")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                    help="LoRA policy (reference = adapter disabled) or full fine-tuning (reference = a full copy)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="TRL's PPOConfig defaults to True; off by default here, as in cai's PPO")
    return check_common_args(ap, ap.parse_args(argv))


def log(msg: str) -> None:
    print(f"[trl_ppo] {msg}", file=sys.stderr, flush=True)


def encode_prompts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    out = []
    for text in texts:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"][-max_len:])
    return out


def run(args: argparse.Namespace) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="trl_ppo_")

    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    original_pad = tokenizer.pad_token_id
    # TRL derives every attention mask as `ids != pad_token_id` and marks the end of a response by its first
    # pad token. With pad == eos (SmolLM2 and cai's tiny model both use <|im_end|>), the EOS tokens inside
    # chat-template prompts would be masked out and the response's own EOS dropped, so, as TRL's example
    # script does, give the tokenizer a pad token of its own. TRL replaces pad ids by 0 before every model
    # call, so the embeddings need no resizing.
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        log(f"pad token was {original_pad!r} (eos {tokenizer.eos_token_id}); using a new [PAD] id {tokenizer.pad_token_id}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{args.policy}: the tokenizer has no eos token, which stop_token='eos' needs")

    texts = load_prompt_texts(args.prompts)
    queries = encode_prompts(tokenizer, texts, args.max_prompt_length)
    if len(queries) < args.batch_size:
        raise ValueError(f"{len(queries)} prompts is fewer than --batch-size {args.batch_size} (TRL drops ragged batches)")
    train_dataset = Dataset.from_dict({"input_ids": queries})

    rm_dir = args.reward_model
    if rm_dir is None:
        rm_dir = make_reward_model(args.policy, os.path.join(tmp.name, "rm"),
                                   original_pad if original_pad is not None else tokenizer.eos_token_id, args.seed)
        log(f"made a reward/value model from the policy with a seeded score head: {rm_dir}")

    dtype = torch.float32  # weights in fp32; on CUDA bf16 autocast through accelerate (bf16=True)
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    ref_policy = None if args.lora else AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=dtype)
    value_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=dtype)
    for name, m in (("reward", reward_model), ("value", value_model)):
        if not hasattr(m, "score") or not hasattr(m, m.base_model_prefix):
            raise ValueError(f"TRL's PPO needs the {name} model to have a `.score` head and a "
                             f"`.{m.base_model_prefix}` backbone; {type(m).__name__} does not")

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")

    config = PPOConfig(
        output_dir=os.path.join(tmp.name, "out"),
        # One iteration = batch_size rollouts; each minibatch (batch_size / mini_batches) is one micro-batch and
        # one optimiser step. (TRL's local_batch_size = per_device_train_batch_size * gradient_accumulation_steps
        # and it hands gradient_accumulation_steps to accelerate, which then accumulates across minibatches, so
        # gradient_accumulation_steps must stay 1 for one step per minibatch.)
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.mini_batches,
        num_ppo_epochs=args.ppo_epochs,
        local_rollout_forward_batch_size=args.batch_size,  # generate and score the batch in one chunk
        total_episodes=args.batch_size * args.iterations,
        response_length=args.response_length,
        stop_token="eos",
        missing_eos_penalty=1.0,
        temperature=args.temperature,
        kl_coef=0.05,
        kl_estimator="k1",
        gradient_checkpointing=args.gradient_checkpointing,
        num_sample_generations=0,
        **hf_trainer_args(args),
    )

    # Timing and token counting (see the module docstring): one update is one trainer step.
    tokens: list[int] = []
    response_tokens: list[int] = []
    counter = {"tokens": 0, "response": 0}

    def reset():
        counter["tokens"] = counter["response"] = 0

    def end_iteration():
        tokens.append(counter["tokens"])
        response_tokens.append(counter["response"])
        reset()

    timer, marks, peaks = iteration_timer(1, log, tokens, on_begin=reset, on_iteration=end_iteration)

    torch.manual_seed(args.seed)  # LoRA's A matrices (get_peft_model runs inside the trainer)
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=None,
        peft_config=peft_config,
        callbacks=[timer],
    )
    context_len: dict[str, int] = {}

    def count_scored_tokens(module, a, kw):
        mask = kw.get("attention_mask")
        if mask is not None:
            counter["tokens"] += int(mask.sum())
            # TRL scores query + response; the query part is the left-padded batch width.
            width = context_len.get("width")
            if width is not None:
                counter["response"] += int(mask[:, width:].sum())

    rm_backbone = getattr(trainer.reward_model, trainer.reward_model.base_model_prefix)
    rm_backbone.register_forward_pre_hook(count_scored_tokens, with_kwargs=True)
    # generate() on the policy receives the left-padded queries; record their width once per rollout, so the
    # reward pass's columns after it are the response.
    gen_model = trainer.accelerator.unwrap_model(trainer.model).policy
    orig_generate = gen_model.generate

    def generate_with_width(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        if ids is not None:
            context_len["width"] = ids.shape[1]
        return orig_generate(*a, **kw)

    gen_model.generate = generate_with_width

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    log(f"trainable parameters (policy{' LoRA' if args.lora else ''} + full value model): {trainable:,}; "
        f"reference: {'adapter disabled' if args.lora else 'full copy'}")
    # Read every weight once (transformers memory-maps checkpoints), so rss_after_load holds the loaded models
    # (policy, value, reward and, without LoRA, the reference copy) and the increase is training's own.
    rss_after_load = resident_after_reading(trainer.model, trainer.ref_model, trainer.reward_model)
    trainer.train()

    seconds = [b - a for a, b in zip(marks, marks[1:])]
    if len(seconds) != args.iterations:
        raise RuntimeError(f"expected {args.iterations} iterations from TRL, saw {len(seconds)}")
    timed_s, timed_tok = seconds[1:], tokens[1:]
    result = {
        **common_result("trl", args, seconds=timed_s, tokens=timed_tok, peak_rss=peaks[-1], rss_after_load=rss_after_load,
                        trainable=trainable, prompts=len(queries)),
        "trl_version": trl.__version__,
        "lora": args.lora,
        "response_tokens_per_iteration": response_tokens[1:],
        "warmup_seconds": round(seconds[0], 4),
    }
    tmp.cleanup()
    return result


if __name__ == "__main__":
    sys.exit(main(run, parse_args(), "trl_ppo"))
