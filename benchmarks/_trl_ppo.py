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
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "What causes rain?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Summarise the plot of Romeo and Juliet.",
    "What is a prime number?",
    "Give me a recipe for pancakes.",
    "How do vaccines work?",
    "What is the difference between weather and climate?",
    "Write a short poem about autumn.",
    "How can I improve my handwriting?",
    "What does a CPU do?",
    "Explain gravity to a child.",
    "What are the benefits of exercise?",
    "How do I make a cup of tea?",
    "Name three famous painters.",
    "What is the boiling point of water?",
    "How do bees make honey?",
    "Give me a fun fact about octopuses.",
    "What is the tallest mountain in the world?",
    "How should I prepare for a job interview?",
    "What is machine learning?",
    "Describe a sunset in two sentences.",
    "How do I plant tomatoes?",
    "What is the speed of light?",
    "Tell me a joke about cats.",
    "Why do leaves change colour in autumn?",
    "How does a bicycle stay upright?",
    "What is the largest ocean?",
    "Give me tips for learning a new language.",
    "What is democracy?",
    "How do I write a thank-you note?",
    "What is the water cycle?",
    "Explain what a budget is.",
    "How can I reduce stress?",
    "What are the primary colours?",
    "How does a rainbow form?",
    "Write a limerick about a dog.",
    "What is an atom?",
    "How do airplanes fly?",
    "What should I pack for a beach trip?",
    "What is the moon made of?",
    "How do I start running?",
    "Explain what a verb is.",
    "What is the population of the Earth?",
    "How do I keep houseplants alive?",
    "What is the history of the bicycle?",
    "Give me a motivational quote.",
    "How does the heart pump blood?",
    "What is a volcano?",
    "How do I save money on groceries?",
    "What is the meaning of the word 'ephemeral'?",
    "Describe the taste of an apple.",
    "How do magnets work?",
    "What is a good book for beginners to read?",
    "How do I tie a tie?",
    "What is the difference between a frog and a toad?",
    "Why do we need sleep?",
    "Plan a simple picnic for two.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="local causal-LM folder")
    ap.add_argument("--reward-model", default=None,
                    help="local sequence-classification folder (num_labels=1); default: one made from --policy "
                         "with a seeded score head, used for both the reward and the value model")
    ap.add_argument("--prompts", default=None, help='JSONL file of {"prompt": ...}; default: 64 built-in prompts')
    ap.add_argument("--batch-size", type=int, default=8, help="rollouts per iteration")
    ap.add_argument("--mini-batches", type=int, default=2, help="minibatches per PPO epoch (one optimiser step each)")
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=4, help="PPO iterations; the first is warm-up and not timed")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                    help="LoRA policy (reference = adapter disabled) or full fine-tuning (reference = a full copy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate (cai's PPO default)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept (the end of longer prompts)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="TRL's PPOConfig defaults to True; off by default here, as in cai's PPO")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice); on a busy CPU box 1 avoids OpenMP "
                         "spin contention, which can slow small matmuls a hundredfold")
    args = ap.parse_args(argv)
    if args.iterations < 2:
        ap.error("--iterations must be at least 2 (the first one is warm-up)")
    if args.batch_size % args.mini_batches:
        ap.error(f"--batch-size ({args.batch_size}) must be divisible by --mini-batches ({args.mini_batches})")
    return args


def log(msg: str) -> None:
    print(f"[trl_ppo] {msg}", file=sys.stderr, flush=True)


def rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil ships with the venv
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def load_prompt_texts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    texts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"{path}:{n}: expected an object with a 'prompt' field")
        texts.append(str(row["prompt"]))
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts


def encode_prompts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    out = []
    for text in texts:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"][-max_len:])
    return out


def make_reward_model(policy: str, out_dir: str, pad_token_id: int | None, seed: int) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the fresh score head is drawn from this
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = pad_token_id
    rm.save_pretrained(out_dir)
    del rm
    return out_dir


def run(args: argparse.Namespace) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
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
        learning_rate=args.lr,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=cuda,
        fp16=False,
        use_cpu=not cuda,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        num_sample_generations=0,
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )

    # Timing and token counting (see the module docstring).
    marks: list[float] = []
    tokens: list[int] = []
    response_tokens: list[int] = []
    peaks: list[float] = []
    counter = {"tokens": 0, "response": 0}

    class Timer(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            counter["tokens"] = counter["response"] = 0
            marks.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
            tokens.append(counter["tokens"])
            response_tokens.append(counter["response"])
            counter["tokens"] = counter["response"] = 0
            log(f"iteration {len(marks) - 1}: {marks[-1] - marks[-2]:.2f}s, {tokens[-1]} tokens")

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
        callbacks=[Timer()],
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
    # transformers 5 memory-maps safetensors checkpoints, so weights only join the resident set when first
    # read; read every weight once now, so rss_after_load holds the loaded models (policy, value, reward and,
    # without LoRA, the reference copy) and the increase during training is training's own.
    with torch.no_grad():
        for module in (trainer.model, trainer.ref_model, trainer.reward_model):
            if module is not None:
                for t in [*module.parameters(), *module.buffers()]:
                    t.sum()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_after_load = rss_mib()
    trainer.train()

    seconds = [b - a for a, b in zip(marks, marks[1:])]
    if len(seconds) != args.iterations:
        raise RuntimeError(f"expected {args.iterations} iterations from TRL, saw {len(seconds)}")
    timed_s, timed_tok = seconds[1:], tokens[1:]
    peak_process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {
        "trainer": "trl",
        "trl_version": trl.__version__,
        "policy": args.policy,
        "batch_size": args.batch_size,
        "mini_batches": args.mini_batches,
        "response_length": args.response_length,
        "ppo_epochs": args.ppo_epochs,
        "lora": args.lora,
        "iterations_timed": len(timed_s),
        "seconds_per_iteration": [round(s, 4) for s in timed_s],
        "tokens_per_iteration": timed_tok,
        "tokens_per_s": round(sum(t / s for t, s in zip(timed_tok, timed_s)) / len(timed_s), 2),
        "peak_rss_mib": round(peaks[-1], 1),
        "rss_after_load_mib": round(rss_after_load, 1),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "token_count": "actual",
        # extras
        "response_tokens_per_iteration": response_tokens[1:],
        "warmup_seconds": round(seconds[0], 4),
        "peak_rss_process_mib": round(peak_process, 1),
        "device": "cuda" if cuda else "cpu",
        "precision": "fp32 weights, bf16 autocast" if cuda else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
        "torch_threads": torch.get_num_threads(),
        "reward_model": args.reward_model or "made from policy (seeded score head)",
        "trainable_params": trainable,
        "prompts": len(queries),
    }
    tmp.cleanup()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # TRL and transformers print to stdout (accelerator.print, PrinterCallback): send fd 1 to stderr while
    # they run and keep a handle on the real stdout for the JSON.
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        result = run(args)
    except Exception as e:
        log(f"TRL PPO failed: {type(e).__name__}: {e}")
        raise
    finally:
        sys.stdout.flush()
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
