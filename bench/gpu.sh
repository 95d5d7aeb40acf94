#!/usr/bin/env bash
# Issue 25's GPU checks in one go, on a machine with torch + transformers + accelerate + peft and no network:
#
#     bash bench/gpu.sh          # ~6 min on one H200: training MFU (~3 min), hf tokens/s (~2 min)
#
# 1. bench/train.py --preset gpu: `undo train` (padded, the GPU default) and `--padding-free` (sdpa once per
#    sequence) on a random-init Qwen2.5-0.5B-sized model, bf16: tokens/s, peak memory, MFU. TRL's variants
#    run only where trl and datasets are installed (else "not measured").
# 2. bench/generation.py --preset gpu: the hf backend batched vs one prompt at a time on the same model.
# 3. bench/real_models.py --scale gpu (issue 33), only where UNDO_REAL_TEACHER and UNDO_REAL_STUDENT name the
#    converted Qwen2.5-Coder-1.5B-Instruct and SmolLM2-135M-Instruct folders on that machine (the models are
#    not in the repository): the UNDO loop at 1000 train / 150 val / 300 test problems, vLLM where it imports.
#
# undo's own imports on these paths beyond torch/transformers/accelerate/peft are rich and jsonlines:
# pure-python wheels in .whl/ (rich, markdown-it-py, mdurl, pygments, jsonlines, attrs), installed into
# a scratch folder when missing. Results: bench/results/{train,generation}-gpu.json, copied to $OUT if set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python -c "import rich, jsonlines" 2>/dev/null; then
    python -m pip install --quiet --no-index --no-deps --target /tmp/undo-bench-site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/undo-bench-site"
fi
python - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(), flush=True)
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv 2>/dev/null
status=0
timeout 270 python bench/train.py --preset gpu || status=$?
timeout 200 python bench/generation.py --preset gpu || status=$?
if [ -n "${UNDO_REAL_TEACHER:-}" ] && [ -n "${UNDO_REAL_STUDENT:-}" ]; then
    timeout 3000 python bench/real_models.py --scale gpu --teacher "$UNDO_REAL_TEACHER" \
        --student "$UNDO_REAL_STUDENT" || status=$?
fi
if [ -n "${OUT:-}" ]; then cp bench/results/*-gpu.json "$OUT"/ 2>/dev/null; fi
exit $status
