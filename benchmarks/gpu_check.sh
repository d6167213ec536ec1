#!/usr/bin/env bash
# One GPU check anyone can run, in under 8 minutes on one GPU (its parts' limits sum to 470 s). It writes
# $OUT/gpu_check.json: the training tests on CUDA, PPO against TRL at the shape of issue #18
# (a random-weight Qwen2.5-1.5B-shaped Llama, batch 64, 4 minibatches, 128-token responses, LoRA r=8,
# 2 runs per trainer), and SFT/RM/DPO tokens/s with model FLOPs utilisation at 256, 512 and 1024 tokens.
# Each part has its own time limit, and the JSON says which parts ran out of it.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run       # tiny shapes on a CPU: checks the script itself, in minutes
#
# Settings (environment): GPU_CHECK_OUT (default ./gpu-check-out), GPU_CHECK_TOKENIZER (a tokenizer folder;
# default ../shared/gpu/tokenizer, else ./gpu-tokenizer), GPU_CHECK_WHEELS (wheels for what the machine's
# image lacks, installed with --no-index into $OUT/site when pydantic cannot be imported; default
# ./gpu-wheels), PYTHON (default .venv/bin/python, else python3).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${GPU_CHECK_OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
TOKENIZER="${GPU_CHECK_TOKENIZER:-}"
if [[ -z "$TOKENIZER" ]]; then
  if [[ -d ../shared/gpu/tokenizer ]]; then TOKENIZER=../shared/gpu/tokenizer; else TOKENIZER=gpu-tokenizer; fi
fi
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/gpu-wheels}"
export PYTHONPATH="$OUT/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
STARTED=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - STARTED ))s] $*" >&2; }

# part NAME LIMIT_S COMMAND...: run it with a time limit, stdout to $OUT/NAME.out, stderr to $OUT/NAME.err.
part() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  log "$name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"timed_out\": $([[ $rc == 124 ]] && echo true || echo false), \"seconds\": $(( $(date +%s) - t0 ))}" >> "$OUT/parts.jsonl"
  log "$name: rc $rc"
}
rm -f "$OUT/parts.jsonl"

if ! "$PY" -c "import pydantic, tenacity, datasets, trl" 2>/dev/null; then
  if [[ -d "$WHEELS" ]]; then
    part install 30 "$PY" -m pip install -q --no-index --no-deps --target "$OUT/site" "$WHEELS"/*.whl
  else
    log "pydantic/tenacity/datasets/trl missing and no wheels at $WHEELS: the parts that need them will fail"
  fi
fi

if [[ $DRY == 1 ]]; then
  SHAPE=tiny; PPO_ARGS=(--batch-size 8 --mini-batches 2 --response-length 16 --iterations 2 --repeats 1)
  LENGTHS=(64 128); BATCH_TOKENS=512; TRAIN_STEPS=1; TESTS=(tests/test_ppo.py -k "seeded or depend or bf16")
else
  SHAPE=1.5b; PPO_ARGS=(--batch-size 64 --mini-batches 4 --response-length 128 --iterations 3 --repeats 2)
  LENGTHS=(256 512 1024); BATCH_TOKENS=4096; TRAIN_STEPS=3
  TESTS=(tests/test_train.py tests/test_ppo.py tests/test_ppo_math.py tests/test_losses.py -k "not vllm")
fi
MODEL="$OUT/random-$SHAPE"

part tests 90 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" "${TESTS[@]}"
part model 30 "$PY" benchmarks/random_model.py --shape "$SHAPE" --tokenizer "$TOKENIZER" --out "$MODEL"
part ppo 200 "$PY" benchmarks/ppo_throughput.py --models "$MODEL" "${PPO_ARGS[@]}" --max-wait 5 --quiet-cpu 100
for L in "${LENGTHS[@]}"; do
  part "train_$L" 40 "$PY" benchmarks/train_throughput.py --model "$MODEL" --synthetic --max-length "$L" \
    --batch-size $(( BATCH_TOKENS / L )) --steps "$TRAIN_STEPS"
done

"$PY" - "$OUT" "$DRY" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"

def read_json(name):
    """The JSON object a benchmark printed last (progress bars may come before it on stdout)."""
    try:
        text = (out / f"{name}.out").read_text()
        return json.loads(text[text.rindex("\n{\n") + 1:] if not text.startswith("{") else text)
    except (OSError, ValueError):
        return None

report = {"check": "gpu_check", "dry_run": dry, "parts": [json.loads(l) for l in (out / "parts.jsonl").read_text().splitlines()]}
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    report["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed}
except (OSError, ET.ParseError, IndexError):
    report["tests"] = None
ppo = read_json("ppo")
if ppo:
    (model,) = ppo["models"].values()
    report["ppo"] = {k: model.get(k) for k in ("speedup", "speedup_per_pair")} | {
        t: {k: model[t].get(k) for k in ("tokens_per_s", "tokens_per_s_runs", "seconds_per_iteration")} for t in ("cai", "trl")} | {
        "cuda_peak_mib": {r["trainer"]: r.get("cuda_peak_mib") for r in model["runs"]},
        "rollout_seconds_per_iteration": [r.get("rollout_seconds_per_iteration") for r in model["runs"] if r["trainer"] == "cai"]}
report["train"] = {}
for part in report["parts"]:
    if part["part"].startswith("train_"):
        data = read_json(part["part"])
        report["train"][part["part"][6:]] = data and {k: data.get(k) for k in ("batch_size", "max_length", "device", "sft", "rm", "dpo")}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
PY
log "done: $OUT/gpu_check.json"
