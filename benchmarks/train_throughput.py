"""Training tokens/s for each trainer (sft, rm, dpo) on one model, and the reward model's held-out
accuracy on HH-RLHF harmless pairs, as JSON.

Tokens/s counts every token through the model in a step (both sides of a pair for rm and dpo),
over `--steps` optimiser steps after one warm-up step. Data: HH pairs (prompt/chosen/rejected) for
rm and dpo, their chosen side as SFT messages.

    .venv/bin/python benchmarks/train_throughput.py --model smollm2-135m-instruct --steps 3
    .venv/bin/python benchmarks/train_throughput.py --model smollm2-135m-instruct --rm-accuracy --train-pairs 1500
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.train.config import TrainConfig  # noqa: E402
from cai.train.data import load_hh_pairs  # noqa: E402
from cai.train.run import run_training  # noqa: E402


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--hh", type=Path, default=ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rm-accuracy", action="store_true", help="also train a LoRA reward model and report held-out accuracy")
    ap.add_argument("--train-pairs", type=int, default=1500)
    ap.add_argument("--eval-pairs", type=int, default=300)
    ap.add_argument("--rm-out", type=Path, default=None,
                    help="keep the accuracy run's reward model here; rerunning the same command resumes it after a kill")
    ap.add_argument("--skip-throughput", action="store_true", help="only the --rm-accuracy run")
    args = ap.parse_args()
    pairs = load_hh_pairs(args.hh)
    random.Random(0).shuffle(pairs)
    report: dict = {"benchmark": "train_throughput", "model": args.model, "batch_size": args.batch_size, "max_length": args.max_length}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft_rows = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]} for p in pairs]
        data = {"sft": write(tmp / "sft.jsonl", sft_rows), "rm": write(tmp / "pairs.jsonl", pairs), "dpo": str(tmp / "pairs.jsonl")}
        for kind in () if args.skip_throughput else ("sft", "rm", "dpo"):
            cfg = TrainConfig(kind=kind, model=args.model, data=data[kind], out=str(tmp / kind), batch_size=args.batch_size,
                              max_length=args.max_length, max_steps=args.steps + 1, eval_fraction=0.0, checkpoint_every=10_000)
            run_training(cfg)
            timed = [json.loads(line) for line in (tmp / kind / "metrics.jsonl").read_text().splitlines()][1:]  # after warm-up
            tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
            report[kind] = {"steps": len(timed), "tokens": tokens, "seconds": round(seconds, 2),
                            "tokens_per_s": round(tokens / seconds, 1), "seconds_per_step": round(seconds / len(timed), 2)}
        if args.rm_accuracy:
            subset = pairs[:args.eval_pairs + args.train_pairs]
            # With --rm-out the data file sits beside it, so a rerun's config (data path included) matches and resumes.
            data_file = args.rm_out.with_name(args.rm_out.name + "-pairs.jsonl") if args.rm_out else tmp / "rm-acc.jsonl"
            if args.rm_out:
                args.rm_out.parent.mkdir(parents=True, exist_ok=True)
            cfg = TrainConfig(kind="rm", model=args.model, data=write(data_file, subset), out=str(args.rm_out or tmp / "rm-acc"),
                              batch_size=8, max_length=args.max_length, epochs=1, eval_fraction=args.eval_pairs / len(subset),
                              checkpoint_every=10 if args.rm_out else 10_000)
            report["rm_accuracy"] = {"train_pairs": len(subset) - args.eval_pairs, **run_training(cfg)["eval"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
