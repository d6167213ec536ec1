"""Peak memory and time of the per-token log-probabilities every trainer takes (`cai.train.losses.token_logprobs`, with
the entropy the RL trainers log, `cai.train.rl.math.entropy_from_logits`), against the whole-batch log_softmax they
used before (the named baseline), forward and backward on logits of one minibatch, as JSON.

Each variant runs in its own process (peak RSS is per process), alternated ABAB; figures are the peak RSS above the
process's own before the step, and the wall time, with their ratios new / baseline.

    .venv/bin/python benchmarks/logprob_memory.py                       # (8, 256, 49152): SmolLM2's vocabulary
    .venv/bin/python benchmarks/logprob_memory.py --batch 4 --tokens 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from cai.train.losses import token_logprobs
from cai.train.rl.math import entropy_from_logits

def baseline_logprobs(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)

def baseline_entropy(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)

variant, B, T, V, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
logits = torch.randn(B, T, V).mul_(3).requires_grad_(True)  # in place: no freed temporary under the start mark
labels = torch.randint(0, V, (B, T))
logprobs, entropy = (token_logprobs, entropy_from_logits) if variant == "cai" else (baseline_logprobs, baseline_entropy)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
lp = logprobs(logits, labels)
with torch.no_grad():
    ent = entropy(logits)
(lp.sum() + 0.0 * ent.sum()).backward()
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"peak_above_start_mib": round(peak - before, 1), "seconds": round(seconds, 3)}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant, alternated ABAB")
    args = ap.parse_args()
    code = CHILD.format(root=str(ROOT))
    runs: dict[str, list[dict]] = {"baseline": [], "cai": []}
    for _ in range(args.repeats):
        for variant, seen in runs.items():
            out = subprocess.run([sys.executable, "-c", code, variant, str(args.batch), str(args.tokens), str(args.vocab),
                                  str(args.threads)], capture_output=True, text=True, check=True)
            seen.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("peak_above_start_mib", "seconds")} for v, rs in runs.items()}
    one = args.batch * args.tokens * args.vocab * 4 / 2**20
    print(json.dumps({"benchmark": "logprob_memory", "shape": [args.batch, args.tokens, args.vocab], "threads": args.threads,
                      "one_logits_tensor_mib": round(one, 1), "runs": runs, "median": med,
                      "memory_ratio": round(med["cai"]["peak_above_start_mib"] / med["baseline"]["peak_above_start_mib"], 3),
                      "time_ratio": round(med["cai"]["seconds"] / med["baseline"]["seconds"], 3)}, indent=2))


if __name__ == "__main__":
    main()
