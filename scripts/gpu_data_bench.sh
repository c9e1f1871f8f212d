#!/usr/bin/env bash
# Data-path benchmark on a GPU machine (from the repo root, PYTHONPATH set; no network needed), about 2-3 minutes:
#   1. a synthetic ImageNet-like JPEG ImageFolder in /tmp (100 classes x 100 train + 5 val, ~500x375, ~100 KiB each;
#      generated in parallel on all cores, ~15 s on 16 cores; no image leaves the machine),
#   2. scripts/benchmark_data.py: CPU path (PIL + augmentation in `nproc` workers) vs GPU path (nvJPEG + GPU
#      augmentation), batch 128 at 224 px -> $OUT/data_bench.json, then a worker sweep -> $OUT/data_bench_sweep.json,
#   3. tests/gpu/test_gpu_decode_gpu.py (nvJPEG vs CPU decode pixels, CUDA loader) -> $OUT/gpu_decode_tests.*
# Every step runs even if an earlier one fails; the exit status is non-zero if any failed.
#
#   OUT=/tmp/bench_out bash scripts/gpu_data_bench.sh
# (DATA_BENCH_CLASSES / _PER_CLASS / _BATCH / _IMG shrink it for a smoke run on a small machine.)
set -uo pipefail

OUT="${OUT:-/tmp/data_bench_out}"
ROOT="${DATA_BENCH_ROOT:-/tmp/visionmamba_synthetic_jpeg}"
CLASSES="${DATA_BENCH_CLASSES:-100}"
PER_CLASS="${DATA_BENCH_PER_CLASS:-100}"
BATCH="${DATA_BENCH_BATCH:-128}"
IMG="${DATA_BENCH_IMG:-224}"
CORES="$(nproc)"
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, tee the output to $OUT/NAME.txt, remember a failure
    local name="$1"
    shift
    echo "== $name: $*" | tee "$OUT/$name.txt"
    local begin=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - begin)) s" | tee -a "$OUT/$name.txt"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1

if [ ! -f "$ROOT/.complete" ]; then
    rm -rf "$ROOT"
    # tqdm's bar goes to stderr: keep it out of the log
    step make_synthetic bash -c "python scripts/make_synthetic_jpeg.py '$ROOT' --classes $CLASSES \
        --train-per-class $PER_CLASS --val-per-class 5 --workers $CORES 2>/dev/null && touch '$ROOT/.complete'"
fi

step data_bench python scripts/benchmark_data.py "$ROOT" --paths cpu gpu --workers "$CORES" --batch-size "$BATCH" \
    --img-size "$IMG" --warmup 5 --batches 40 --time-batches 10 --json "$OUT/data_bench.json"

# The GPU path's workers only read files: how few does it need? And the CPU path with half the cores.
step data_bench_sweep python scripts/benchmark_data.py "$ROOT" --paths gpu cpu --workers 4 $((CORES / 2)) \
    --batch-size "$BATCH" --img-size "$IMG" --warmup 5 --batches 25 --time-batches 5 --json "$OUT/data_bench_sweep.json"

step gpu_decode_tests env VISIONMAMBA_GPU_REPORT="$OUT/gpu_decode_tests.json" \
    python -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_decode_gpu.py

echo "total ${SECONDS} s; results in $OUT (exit $status)"
exit "$status"
