"""cai's own PPO (`cai.train.rl.ppo.PPOTrainer`) timed per iteration, as one JSON object: the twin of `_trl_ppo.py`.

Run by `benchmarks/ppo_throughput.py` as a subprocess, next to TRL's PPO, with the same knobs:

    .venv/bin/python benchmarks/_cai_ppo.py --policy MODEL_DIR [--reward-model RM_DIR] --batch-size 8 \
        --mini-batches 2 --response-length 32 --ppo-epochs 1 --iterations 4 --seed 0 [--prompts FILE.jsonl]

One iteration is cai's `ppo_iteration`: rollout of `--batch-size` prompts, scoring with the reward model,
log-probs and values (adapter on), reference log-probs (adapter off), GAE, then `--ppo-epochs` passes over
`--mini-batches` minibatches (one optimiser step per minibatch). The policy is always base + LoRA (r=8,
alpha=16, all-linear), as cai's PPO requires; the settings otherwise match `_trl_ppo.py` (temperature 1.0,
kl_coef 0.05, k1, missing_eos_penalty 1.0, no gold judge).

Timing and tokens come from the run's `metrics.jsonl`: `seconds` is the whole `ppo_iteration` and `tokens`
the non-pad query tokens plus each response up to and including its first EOS (the same count as
`_trl_ppo.py`). The first iteration is dropped as warm-up. Checkpoints are off (checkpoint_every is larger
than the run); the one written after the last iteration, the final adapter and the loss plot come after
the timed iterations.

Memory: `rss_after_load_mib` is the resident set just before `trainer.train()` (policy with LoRA and value
head, reward model, optimiser object built; every weight read once first, since transformers memory-maps
the checkpoint); `peak_rss_mib` is `ru_maxrss` when the last iteration returns, before the final checkpoint,
adapter save and matplotlib plot (`peak_rss_process_mib` is `ru_maxrss` at the very end); on CUDA also
`torch.cuda.max_memory_allocated()`.

`cai_ppo_source` records the git blob ids of `cai/train/rl/trainer.py`, `ppo.py` and `sampling.py` as run and whether they
match HEAD, since those files change while the benchmark is in use.

All logs go to stderr (stdout is redirected at the file-descriptor level while the trainer runs, since
rich's progress bar and transformers print to stdout); the JSON object is the only thing written to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _ppo_common import (DEFAULT_PROMPTS, add_common_args, check_common_args, common_result, load_prompt_texts,  # noqa: E402
                         main, make_reward_model, max_rss_mib, resident_after_reading)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="local causal-LM folder (or a name cai.models.resolve_model knows)")
    ap.add_argument("--reward-model", default=None,
                    help="local sequence-classification folder (num_labels=1) with its tokenizer; default: one made "
                         "from --policy with a seeded score head")
    add_common_args(ap)
    return check_common_args(ap, ap.parse_args(argv))


def log(msg: str) -> None:
    print(f"[cai_ppo] {msg}", file=sys.stderr, flush=True)


def source_version(paths: list[str]) -> dict:
    """The git blob ids of the trainer's sources as run, and whether they are the committed ones (they change under work)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    rels = [Path(p).resolve().relative_to(root).as_posix() for p in paths]
    blobs = {}
    for path, rel in zip(paths, rels):
        data = Path(path).read_bytes()
        blobs[rel] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # what `git hash-object` prints
    head = subprocess.run(["git", "rev-parse", "HEAD", *[f"HEAD:{rel}" for rel in rels]], cwd=root, capture_output=True,
                          text=True).stdout.split()
    return {"files": blobs, "git_head": head[0] if head else None,
            "committed": len(head) == len(rels) + 1 and head[1:] == list(blobs.values())}


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    import cai.train.rl.ppo
    import cai.train.rl.sampling
    import cai.train.rl.trainer
    from cai.train.rl.ppo import PPOJob, build_trainer

    source = source_version([cai.train.rl.trainer.__file__, cai.train.rl.ppo.__file__, cai.train.rl.sampling.__file__])

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    tmp = tempfile.TemporaryDirectory(prefix="cai_ppo_")

    prompts = args.prompts
    if prompts is None:
        prompts = os.path.join(tmp.name, "prompts.jsonl")
        Path(prompts).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
    n_prompts = len(load_prompt_texts(prompts))

    rm_dir = args.reward_model
    if rm_dir is None:
        tokenizer = AutoTokenizer.from_pretrained(args.policy)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rm_dir = make_reward_model(args.policy, os.path.join(tmp.name, "rm"), pad, args.seed)
        tokenizer.save_pretrained(rm_dir)  # cai's scorer reads the reward model's own tokenizer
        log(f"made a reward model from the policy with a seeded score head: {rm_dir}")

    cfg = PPOJob(
        model=args.policy, reward=rm_dir, prompts=prompts, out=os.path.join(tmp.name, "out"),
        max_prompt_length=args.max_prompt_length, iterations=args.iterations, batch_size=args.batch_size,
        mini_batches=args.mini_batches, ppo_epochs=args.ppo_epochs, response_length=args.response_length,
        temperature=args.temperature, kl_coef=0.05, kl_estimator="k1", adaptive_kl=False, missing_eos_penalty=1.0,
        lr=args.lr, lora_r=8, lora_alpha=16, lora_target_modules="all-linear", gold_judge_every=0,
        checkpoint_every=10**9, log_samples_every=10**9, seed=args.seed,
    )
    trainer = build_trainer(cfg)
    scorer_model = getattr(trainer.scorer, "model", None)

    # The peak of training itself: ru_maxrss as each iteration returns (the final checkpoint, adapter save and
    # the matplotlib loss plot come after the last one).
    peaks: list[float] = []
    update = trainer.update  # the end of an iteration: train() calls update(rollout(i))

    def timed_update(rollout):
        out = update(rollout)
        if cuda:
            torch.cuda.synchronize()
        peaks.append(max_rss_mib())
        log(f"iteration {rollout.iteration + 1}: {out[0]['seconds']:.2f}s, {out[0]['tokens']} tokens")
        return out

    trainer.update = timed_update

    trainable = sum(p.numel() for p in trainer.params)
    log(f"trainable parameters (policy LoRA + value head): {trainable:,}; reference: adapter disabled")
    # Read every weight once, as _trl_ppo.py does, so rss_after_load holds the loaded models (policy and reward
    # model) and the increase during training is training's own.
    rss_after_load = resident_after_reading(trainer.model, scorer_model)
    trainer.train()

    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) != args.iterations:
        raise RuntimeError(f"expected {args.iterations} iterations in metrics.jsonl, saw {len(rows)}")
    timed = rows[1:]
    result = {
        **common_result("cai", args, seconds=[r["seconds"] for r in timed], tokens=[r["tokens"] for r in timed],
                        peak_rss=peaks[-1], rss_after_load=rss_after_load, trainable=trainable, prompts=n_prompts),
        "cai_ppo_source": source,
        "lora": True,
        "response_tokens_per_iteration": [round(r["response/length_mean"] * args.batch_size) for r in timed],
        "rollout_seconds_per_iteration": [r["time/rollout_s"] for r in timed],
        "score_seconds_per_iteration": [r["time/score_s"] for r in timed],
        "warmup_seconds": rows[0]["seconds"],
        "gradient_checkpointing": False,
    }
    tmp.cleanup()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[cai_ppo] %(name)s: %(message)s")
    sys.exit(main(run, parse_args(), "cai_ppo"))
