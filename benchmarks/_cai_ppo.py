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
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _ppo_common import (add_common_args, cai_inputs, cai_job_fields, cai_run_result, check_common_args, main,  # noqa: E402
                         resident_after_reading, time_updates)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, policy_help="local causal-LM folder (or a name cai.models.resolve_model knows)",
                    reward_help="local sequence-classification folder (num_labels=1) with its tokenizer; default: one "
                                "made from --policy with a seeded score head")
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

    import cai.train.rl.ppo
    import cai.train.rl.sampling
    import cai.train.rl.trainer
    from cai.train.rl.ppo import PPOJob, build_trainer

    source = source_version([cai.train.rl.trainer.__file__, cai.train.rl.ppo.__file__, cai.train.rl.sampling.__file__])

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="cai_ppo_")

    prompts, n_prompts, rm_dir = cai_inputs(args, tmp.name, log)

    cfg = PPOJob(**cai_job_fields(args, os.path.join(tmp.name, "out"), prompts, rm_dir), kl_coef=0.05, kl_estimator="k1",
                 missing_eos_penalty=1.0)
    trainer = build_trainer(cfg)
    scorer_model = getattr(trainer.scorer, "model", None)

    peaks = time_updates(trainer, log)
    trainable = sum(p.numel() for p in trainer.params)
    log(f"trainable parameters (policy LoRA + value head): {trainable:,}; reference: adapter disabled")
    # Read every weight once, as _trl_ppo.py does, so rss_after_load holds the loaded models (policy and reward
    # model) and the increase during training is training's own.
    rss_after_load = resident_after_reading(trainer.model, scorer_model)
    trainer.train()

    result = {
        **cai_run_result(args, cfg.out, peaks=peaks, rss_after_load=rss_after_load, trainable=trainable, prompts=n_prompts),
        "cai_ppo_source": source,
    }
    tmp.cleanup()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[cai_ppo] %(name)s: %(message)s")
    sys.exit(main(run, parse_args(), "cai_ppo"))
