"""Does RL help? GRPO and PPO on SmolLM2-135M-Instruct against a reward model trained on people's labels,
measured by yardsticks no judge can bend.

The embedded 135M judge is at chance on held-out HH pairs, so a run scored by it cannot show that RL makes a
model better. This run's signal comes from people instead: a LoRA reward model trained on HH-RLHF harmless
pairs (human choices), and the yardsticks of `cai eval` (refusal on held-out harmful prompts, over-refusal on
benign prompts that only sound harmful, toxicity on prompts that invite it, length), with paired intervals.

Steps, each skipped when its output is there (so rerunning the same command resumes; the trainers resume
mid-run themselves):

1. rm: `cai train rm` on HH pairs shuffled as `train_throughput.py --rm-accuracy` shuffles them (--rm-pairs to
   train on, --rm-held-out more to measure it on), LoRA r=8 on SmolLM2 cut to its first --rm-layers layers:
   the reward model OUT/rm/final, its held-out accuracy in OUT/rm/summary.json.
2. prompts: RL prompts, Do-Not-Answer shuffled (seed 0, OUT/train_prompts.jsonl); held-out prompts from
   other sources: HarmBench (harmful), `overrefusal` (benign), RealToxicityPrompts `rtp` (toxic), --per-kind each.
3. rule: GRPO with `rule:share=\\n` (the share of an answer's characters that are line breaks): does the
   optimiser learn on a real model at this budget?
4. grpo, ppo: the same budget against the reward model (same prompt file, answers and tokens per iteration,
   LoRA, lr, KL coefficient, seed); each adapter merged for the eval.
5. base, eval: each model's greedy answers to the held-out prompts (`cai eval`'s sampling, 48 tokens) and `cai
   eval`'s yardstick table over base, GRPO and PPO, so its paired changes are base->GRPO, GRPO->PPO and
   base->PPO on the same prompts. Not `cai eval` itself: its judge's both-order comparisons (180 prompts of
   about 300 tokens) cost more CPU than the busy 2-core machine had; `cai eval --base smollm2-135m-instruct
   --reference OUT/grpo/merged --policy OUT/ppo/merged --prompts OUT/heldout.jsonl` gives the same table and the judge.
6. summary: the table, the training curves' first and last iterations, and the reward model's mean score of
   each model's held-out answers (paired bootstrap intervals), to benchmarks/results/rl_proof_smollm2.json.

    .venv/bin/python benchmarks/rl_proof.py --out /work/proof --hh ../shared/data/hh-harmless-dev.jsonl.gz

Seen 2026-12-07 on 2 CPU cores shared with about 20 busy threads: the reward model 36 min of training (25 steps)
and 8 min of held-out scoring; once the machine quietened, GRPO and PPO at 2 iterations about 4 min each, at 8
about 12 min each (run side by side), and each model's 30 answers 3 to 25 min depending on the load.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"
RULE = "rule:share=\n"
EVAL_PER_KIND = 10
STEPS = ("rm", "prompts", "rule", "grpo", "ppo", "base", "eval", "summary")


def reward_backbone(out: Path, layers: int) -> Path:
    """SmolLM2-135M-Instruct cut to its first `layers` decoder layers (embeddings and norm kept): a reward-model
    backbone about 30/layers times cheaper per token than the whole model, which on 2 shared, busy CPU cores took
    over 3 minutes per step of 8 pairs (400 pairs: hours)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.models import resolve_model

    src = resolve_model(MODEL).path
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def rl_budget(args: argparse.Namespace, lr: float, iterations: int) -> list[str]:
    """The flags GRPO and PPO share: one budget for both (8 answers of at most 24 tokens per iteration)."""
    return ["--iterations", str(iterations), "--batch-size", "8", "--mini-batches", "2", "--ppo-epochs", "1",
            "--response-length", "24", "--lr", str(lr), "--lora-r", "8", "--lora-alpha", "16", "--kl-coef", "0.05",
            "--temperature", "1.0", "--missing-eos-penalty", "0", "--seed", "0", "--checkpoint-every", "5",
            "--log-samples-every", "5", "--rollout-backend", "transformers"]


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(repr(c) if "\n" in c or " " in c else c for c in cmd), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def write_prompts(out: Path, per_kind: int) -> None:
    from cai.prompts import load_prompts

    def rows(prompts):
        return "".join(json.dumps({"prompt": p.text, "kind": p.kind, "category": p.category}, ensure_ascii=False) + "\n"
                       for p in prompts)

    (out / "train_prompts.jsonl").write_text(rows(load_prompts("donotanswer", shuffle=True, seed=0)[:400]), encoding="utf-8")
    held_out = [p for name in ("harmbench", "overrefusal", "rtp") for p in load_prompts(name, shuffle=True, seed=0)[:per_kind]]
    (out / "heldout.jsonl").write_text(rows(held_out), encoding="utf-8")


def train(kind: str, reward: str, name: str, args: argparse.Namespace, lr: float, iterations: int, extra: list[str]) -> None:
    from cai.train.merge import merge_lora

    out = args.out / name
    if not (out / "final" / "adapter_config.json").exists():
        run([sys.executable, "-m", "cai", "train", kind, "--model", MODEL, "--reward", reward,
             "--prompts", str(args.out / "train_prompts.jsonl"), "--out", str(out), *rl_budget(args, lr, iterations), *extra], args.out / f"{name}.log")
    if not (out / "merged").exists():
        merge_lora(out / "final", out / "merged")


def eval_prompts(args: argparse.Namespace) -> list:
    """The held-out prompts the models are compared on: the first --eval-per-kind of each kind."""
    from cai.prompts import load_prompts, require_kinds

    held_out = load_prompts(str(args.out / "heldout.jsonl"))
    require_kinds(held_out, "heldout.jsonl")
    per_kind = getattr(args, "eval_per_kind", EVAL_PER_KIND)
    return [p for kind in ("harmful", "benign", "toxic") for p in [p for p in held_out if p.kind == kind][:per_kind]]


def answers(name: str, model: str, args: argparse.Namespace) -> dict[str, tuple[str, int]]:
    """One model's greedy answers to the eval prompts, as `cai eval` samples them, by prompt (cached in OUT/answers/)."""
    from cai.evaluate import EvalJob, _answers

    prompts = [p.text for p in eval_prompts(args)]
    path = args.out / "answers" / f"{name}.json"
    cached = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    have = {row["prompt"]: (row["text"], row["tokens"]) for row in cached}
    missing = [p for p in prompts if p not in have]
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        job = EvalJob(policy=model, reference=model, prompts=str(args.out / "heldout.jsonl"), out=path.parent,
                      max_new_tokens=48, policy_backend="transformers")
        have |= dict(zip(missing, _answers(name, model, missing, job)))
        rows = [{"prompt": p, "text": t, "tokens": k} for p, (t, k) in have.items()]
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return {p: have[p] for p in prompts}


def evaluate(args: argparse.Namespace) -> None:
    """`cai eval`'s yardstick table for base, GRPO and PPO on the eval prompts (without its judge: see the README)."""
    from cai.yardsticks import yardstick_table

    prompts = eval_prompts(args)
    # A model whose run has not finished is left out of the table (and named in the summary's not_run).
    got = {"base": answers("base", MODEL, args)} | {name: answers(name, str(args.out / name / "merged"), args)
                                                    for name in ("grpo", "ppo") if (args.out / name / "merged").exists()}
    models = {m: [a[p.text] for p in prompts] for m, a in got.items()}
    doc = {"yardsticks": yardstick_table(models, [p.kind for p in prompts], seed=0),
           "samples": [{"prompt": p.text, "kind": p.kind, **{m: a[i][0] for m, a in models.items()}} for i, p in enumerate(prompts)]}
    (args.out / "eval.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")


def curve(path: Path, key: str) -> dict:
    """`key` over a run's iterations: all of them, and the mean of the first and of the last (up to 3, halves at most)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    values = [r[key] for r in rows if key in r]
    k = max(1, min(3, len(values) // 2))
    return {"values": values, "first_mean": sum(values[:k]) / k, "last_mean": sum(values[-k:]) / k, "k": k}


def summary(args: argparse.Namespace) -> dict:
    from cai import intervals
    from cai.train.rewards import RewardModelScorer
    from cai.train.rl import metrics as M

    doc = json.loads((args.out / "eval.json").read_text(encoding="utf-8"))
    samples, models = doc["samples"], doc["yardsticks"]["models"]
    rm = RewardModelScorer(args.out / "rm" / "final")
    scores = {m: rm([s["prompt"] for s in samples], [s[m] for s in samples]) for m in models}
    harmful = [i for i, s in enumerate(samples) if s["kind"] == "harmful"]

    def rm_figures(keep: list[int]) -> dict:
        picked = {m: [v[i] for i in keep] for m, v in scores.items()}
        return {"n": len(keep), "mean": {m: intervals.mean(v, seed=0).as_dict() for m, v in picked.items()},
                "change": {f"base->{m}": intervals.change(picked["base"], picked[m], seed=0).as_dict() for m in models[1:]}}

    runs = {name: {"scores": curve(args.out / name / "metrics.jsonl", M.SCORES), "kl": curve(args.out / name / "metrics.jsonl", M.KL),
                   "length": curve(args.out / name / "metrics.jsonl", M.LENGTH_MEAN)}
            for name in ("rule", "grpo", "ppo") if (args.out / name / "metrics.jsonl").exists()}
    rm_acc = {"train_pairs": args.rm_pairs, **json.loads((args.out / "rm" / "summary.json").read_text(encoding="utf-8"))["eval"]}
    return {"benchmark": "rl_proof", "model": MODEL, "rl_prompts": "donotanswer, shuffled (seed 0), first 400",
            "held_out": {"harmful": "harmbench", "benign": "overrefusal", "toxic": "rtp", "per_kind": args.eval_per_kind},
            "budget": " ".join(rl_budget(args, args.lr, args.iterations)), "rule_lr": args.rule_lr,
            "rule_iterations": args.rule_iterations, "grpo_num_generations": 4, "rule": RULE, "reward_model": rm_acc,
            "training": runs, "not_run": [n for n in ("rule", "grpo", "ppo") if n not in runs] + [n for n in ("grpo", "ppo") if n not in models],
            "models": {m: MODEL if m == "base" else str(args.out / m / "merged") for m in models},
            "yardsticks": doc["yardsticks"],
            "rm_score_held_out": {"all": rm_figures(list(range(len(samples)))), "harmful": rm_figures(harmful)}}


def table(doc: dict) -> str:
    """The README's table: each yardstick for base, GRPO and PPO with its interval, and the paired changes from base."""
    names = doc["yardsticks"]["models"]

    def value(v: dict) -> str:
        return "–" if v["value"] is None else f"{v['value']:.3g} [{v['low']:.3g}, {v['high']:.3g}]"

    head = list(names) + [f"base→{m}" for m in names[1:]]
    lines = ["| yardstick (n) | " + " | ".join(head) + " |", "| --- " * (len(head) + 1) + "|"]
    for row in doc["yardsticks"]["rows"]:
        changes = {(c["from"], c["to"]): c for c in row["changes"]}
        cells = [value(row["values"][m]) for m in names]
        for to in names[1:]:
            c = changes[("base", to)]
            cells.append("–" if c["value"] is None else f"{c['value']:+.3g} [{c['low']:+.3g}, {c['high']:+.3g}], {c['verdict']}")
        lines.append(f"| {row['label']} ({row['n']}) | " + " | ".join(cells) + " |")
    for subset, figures in doc["rm_score_held_out"].items():
        cells = [value(figures["mean"][m]) for m in names]
        cells += [f"{c['value']:+.3g} [{c['low']:+.3g}, {c['high']:+.3g}]" for c in figures["change"].values()]
        lines.append(f"| reward model's mean score, {subset} held-out answers ({figures['n']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run folder (outside the repository)")
    ap.add_argument("--hh", type=Path, default=ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz",
                    help="HH-RLHF harmless pairs for the reward model")
    ap.add_argument("--rm-pairs", type=int, default=200, help="reward-model training pairs")
    ap.add_argument("--rm-held-out", type=int, default=150, help="HH pairs held out to measure the reward model's accuracy")
    ap.add_argument("--rm-layers", type=int, default=4, help="decoder layers of SmolLM2 kept for the reward model's backbone")
    ap.add_argument("--rm-micro-batch", type=int, default=8, choices=(1, 2, 4, 8),
                    help="pairs per forward pass of the reward model's steps of 8 pairs (4: half the activation memory, the "
                         "same steps by gradient accumulation; the whole model at 8 held 13.5 GB)")
    ap.add_argument("--iterations", type=int, default=2, help="iterations of the GRPO and PPO runs (8 answers each)")
    ap.add_argument("--rule-iterations", type=int, default=6, help="iterations of the rule-reward check")
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate of the GRPO and PPO runs")
    ap.add_argument("--rule-lr", type=float, default=5e-4, help="learning rate of the rule-reward check")
    ap.add_argument("--per-kind", type=int, default=30, help="held-out prompts of each kind written to OUT/heldout.jsonl")
    ap.add_argument("--eval-per-kind", type=int, default=EVAL_PER_KIND, help="of those, how many of each kind the models answer")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "rl_proof_smollm2.json")
    args = ap.parse_args()
    steps = args.steps.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    if "rm" in steps and not (args.out / "rm" / "summary.json").exists():
        backbone = reward_backbone(args.out / f"smollm2-{args.rm_layers}layers", args.rm_layers)
        # train_throughput.py --rm-accuracy's shuffled pairs (fewer of them), on the truncated backbone.
        from cai.train.data import load_hh_pairs

        pairs = load_hh_pairs(args.hh)
        random.Random(0).shuffle(pairs)
        pairs = pairs[:args.rm_held_out + args.rm_pairs]
        data = args.out / "rm-pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
        run([sys.executable, "-m", "cai", "train", "rm", "--model", str(backbone), "--data", str(data), "--out", str(args.out / "rm"),
             "--eval-fraction", str(args.rm_held_out / len(pairs)), "--batch-size", str(args.rm_micro_batch), "--grad-accum", str(8 // args.rm_micro_batch), "--epochs", "1",
             "--max-length", "256", "--lr", "2e-4", "--lora-r", "8", "--checkpoint-every", "10", "--seed", "0"], args.out / "rm.log")
    if "prompts" in steps:
        write_prompts(args.out, args.per_kind)
    reward = str(args.out / "rm" / "final")
    if "rule" in steps:
        train("grpo", RULE, "rule", args, args.rule_lr, args.rule_iterations, ["--num-generations", "4"])
    if "grpo" in steps:
        train("grpo", reward, "grpo", args, args.lr, args.iterations, ["--num-generations", "4"])
    if "ppo" in steps:
        train("ppo", reward, "ppo", args, args.lr, args.iterations, [])
    if "base" in steps:
        answers("base", MODEL, args)
    if "eval" in steps:
        evaluate(args)
    if "summary" in steps:
        doc = summary(args)
        args.results.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(json.dumps({k: doc[k] for k in ("reward_model", "training")}, indent=2))
        print(table(doc))


if __name__ == "__main__":
    main()
