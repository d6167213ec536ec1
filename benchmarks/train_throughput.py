"""Training tokens/s for each trainer (sft, rm, dpo) on one model, and the reward model's held-out
accuracy on HH-RLHF harmless pairs, as JSON.

Tokens/s counts every token through the model in a step (both sides of a pair for rm and dpo),
over `--steps` optimiser steps after one warm-up step. Data: HH pairs (prompt/chosen/rejected) for
rm and dpo, their chosen side as SFT messages.

    .venv/bin/python benchmarks/train_throughput.py --model smollm2-135m-instruct --steps 3
    .venv/bin/python benchmarks/train_throughput.py --model smollm2-135m-instruct --rm-accuracy --train-pairs 1500
    .venv/bin/python benchmarks/train_throughput.py --model MODEL_DIR --synthetic --max-length 512 --batch-size 8

`--synthetic` trains on seeded rows of random words, every one at least `--max-length` tokens, so every
step is exactly batch x max_length tokens per side (HH's texts are mostly shorter than 256 tokens);
it needs no data files. Each trainer's entry also has `model_flops_per_token` (6N + 12 * layers *
hidden * length, the PaLM convention, counting the full backward even for LoRA, which skips the
frozen weights' gradients) and, on a GPU whose bf16 peak is known (or `--peak-tflops`), `mfu`.
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

from cai.train.settings import TrainJob  # noqa: E402
from cai.train.data import load_hh_pairs  # noqa: E402
from cai.train.run import run_training  # noqa: E402


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


WORDS = ("the model answer question careful reason people water light house river stone garden music letter window "
         "simple number paper table morning evening friend travel market winter summer doctor school planet story").split()


def synthetic_pairs(length: int, n: int = 256) -> list[dict]:
    """Seeded rows whose prompt is 32 words and each answer `length` words (about a token each, so at least
    `length` tokens): every tokenised row is cut to exactly max_length."""
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": text(32), "chosen": text(length), "rejected": text(length)} for _ in range(n)]


def model_flops_per_token(model: str, length: int) -> int:
    """6N + 12 * layers * hidden * length: a training step's FLOPs per token (PaLM's MFU convention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cai.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model).path)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * length


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, SXM where it matters


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_flops(given: float | None) -> float | None:
    if given:
        return given * 1e12
    name = device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


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
    ap.add_argument("--synthetic", action="store_true", help="seeded random-word rows of at least --max-length tokens, no data file")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for mfu (default: known GPUs)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()
    pairs = synthetic_pairs(args.max_length) if args.synthetic else load_hh_pairs(args.hh)
    random.Random(0).shuffle(pairs)
    flops_per_token, peak = model_flops_per_token(args.model, args.max_length), peak_flops(args.peak_tflops)
    report: dict = {"benchmark": "train_throughput", "model": args.model, "batch_size": args.batch_size, "max_length": args.max_length,
                    "synthetic": args.synthetic, "device": device_name(), "peak_tflops": peak and peak / 1e12,
                    "model_flops_per_token": flops_per_token}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft_rows = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]} for p in pairs]
        data = {"sft": write(tmp / "sft.jsonl", sft_rows), "rm": write(tmp / "pairs.jsonl", pairs), "dpo": str(tmp / "pairs.jsonl")}
        for kind in () if args.skip_throughput else ("sft", "rm", "dpo"):
            cfg = TrainJob(kind=kind, model=args.model, data=data[kind], out=str(tmp / kind), batch_size=args.batch_size,
                              max_length=args.max_length, max_steps=args.steps + 1, eval_fraction=0.0, checkpoint_every=10_000,
                              precision=args.precision)
            run_training(cfg)
            timed = [json.loads(line) for line in (tmp / kind / "metrics.jsonl").read_text().splitlines()][1:]  # after warm-up
            tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
            report[kind] = {"steps": len(timed), "tokens": tokens, "seconds": round(seconds, 2),
                            "tokens_per_s": round(tokens / seconds, 1), "seconds_per_step": round(seconds / len(timed), 2),
                            "mfu": round(flops_per_token * tokens / seconds / peak, 4) if peak else None}
        if args.rm_accuracy:
            subset = pairs[:args.eval_pairs + args.train_pairs]
            # With --rm-out the data file sits beside it, so a rerun's config (data path included) matches and resumes.
            data_file = args.rm_out.with_name(args.rm_out.name + "-pairs.jsonl") if args.rm_out else tmp / "rm-acc.jsonl"
            if args.rm_out:
                args.rm_out.parent.mkdir(parents=True, exist_ok=True)
            cfg = TrainJob(kind="rm", model=args.model, data=write(data_file, subset), out=str(args.rm_out or tmp / "rm-acc"),
                              batch_size=8, max_length=args.max_length, epochs=1, eval_fraction=args.eval_pairs / len(subset),
                              checkpoint_every=10 if args.rm_out else 10_000)
            report["rm_accuracy"] = {"train_pairs": len(subset) - args.eval_pairs, **run_training(cfg)["eval"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
