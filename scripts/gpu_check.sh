#!/usr/bin/env bash
# The device check, for a lent GPU machine (one H200: under 8 minutes in all). It runs
#   1. the CUDA tests (tests/test_gpu.py, marked gpu) and the Triton passes' tests on CUDA (tests/test_triton.py);
#   2. the memory harness (torch.cuda.max_memory_allocated; step times between torch.cuda.synchronize calls)
#      on ViT-B/16, ViT-L/16, ViT-H/14 at batch 8 with full, LoRA-8, LoRA-32, GPS-style, snell-reference,
#      SNELL-32 and SNELLA-32, one worker process per method;
#   3. the table that puts the paper's GPU memory (SNELL paper, batch 8) beside ours.
# Every step has its own time limit, so a hang costs that step only; results are written as they come
# (bench/results/, file names carry the GPU's name) and the log goes to $OUT (or bench/results/) too.
# Budget: 120 + 75 + 100 + 130 + 15 = 440 s of limits. Usage: bash scripts/gpu_check.sh   (exit 0: all steps ran; 1: some step failed or timed out; 2: no GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-bench/results}
LOG_DIR=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); this script needs a GPU machine." >&2
    echo "gpu_check: on CPU, the Triton passes are tested through the interpreter by 'bash scripts/test.sh'." >&2
    exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG_DIR/gpu_check.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG_DIR/gpu_check.log"
    [ "$rc" -eq 0 ] || status=1
}

step "CUDA and Triton tests" 120 "$PY" -m pytest tests/test_gpu.py tests/test_triton.py -q -x -p no:cacheprovider
METHODS="full lora-8 lora-32 gps-style snell-reference snell-fused snella-fused"
for spec in "vit_base_patch16_224 75 25 3" "vit_large_patch16_224 100 35 2" "vit_huge_patch14_224 130 45 2"; do
    set -- $spec  # model, limit of the whole model, limit of one worker, timed steps
    # shellcheck disable=SC2086
    step "memory/speed $1" "$2" "$PY" -m snella bench memory --device cuda --models "$1" --batches 8 --steps "$4" \
        --methods $METHODS --output-dir "$RESULTS" --timeout "$3" --keep-going
done
CSV=$(ls -t "$RESULTS"/memory-speed-cuda-*.csv 2>/dev/null | head -1)
if [ -n "$CSV" ]; then
    step "paper table" 15 "$PY" -m snella.bench.paper "$CSV" --out "${CSV%.csv}-paper.md"
    cp "$CSV" "${CSV%.csv}-paper.md" "$LOG_DIR"/ 2>/dev/null || true
else
    echo "gpu_check: no CUDA results were written" >&2
    status=1
fi
exit $status
