#!/usr/bin/env bash
# GPU machine check: install the carried wheels, run the GPU test suite, then benchmark (with a profile).
#
#   bash scripts/gpu_check.sh            # from the repository root; logs and JSON go to $OUT (default ./gpu_out)
#
# Stages (GPU_CHECK_STAGES, default "tests bench interleave"): the GPU tests; a sequential benchmark with peak memory,
# a profile and the pure-PyTorch reference rows; an interleaved benchmark for throughput ratios. Size with
# BENCH_BATCH / BENCH_IMG; sequential timing with BENCH_TIMING (default "--warmup 3 --iters 5 --repeats 3").
# The wheels come from ./.whl (see ../shared/device/README.md); they are installed only when the kernels do not
# import yet. Exit status: non-zero when the install, any GPU test or any benchmark row failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
STAGES="${GPU_CHECK_STAGES:-tests bench interleave}"
BATCH="${BENCH_BATCH:-128}"
IMG="${BENCH_IMG:-224}"
TIMING="${BENCH_TIMING:---warmup 3 --iters 5 --repeats 3}"

if ! PYTHONPATH="$SITE" python3 -c "import selective_scan_cuda, causal_conv1d.cpp_functions" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
        || { echo "gpu_check: wheel install failed" >&2; exit 1; }
fi
export PYTHONPATH="$SITE:$PWD"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 - <<'PY'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for pkg in ("mamba_ssm", "causal_conv1d", "timm", "triton"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
PY
} 2>&1 | tee "$OUT/env.txt"

rc=0
if [[ " $STAGES " == *" tests "* ]]; then
    echo "== GPU tests =="
    VISIONMAMBA_GPU_REPORT="$OUT/gpu_test_errors.json" \
        python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" || rc=1
fi
if [[ " $STAGES " == *" bench "* ]]; then
    echo "== benchmark (batch $BATCH, $IMG px, bf16 autocast, fwd+bwd+AdamW and inference; rows one after another) =="
    # Baseline first (ratios are against it); the slow pure-PyTorch reference rows last and with 1 + 2 steps only.
    REF_STEPS="warmup=1,iters=1,repeats=2"
    # shellcheck disable=SC2086  # TIMING is a list of flags
    python3 scripts/benchmark.py \
        deit_tiny_patch16_224 \
        vim_tiny@backend=cuda,label=vim_tiny/cuda \
        shufflemamba_tiny@backend=cuda,label=shufflemamba_tiny/cuda \
        "vim_tiny@backend=ref,$REF_STEPS,label=vim_tiny/ref" \
        "shufflemamba_tiny@backend=ref,$REF_STEPS,label=shufflemamba_tiny/ref" \
        --batch-size "$BATCH" --img-size "$IMG" --dtype bf16 $TIMING \
        --profile --profile-rows shufflemamba_tiny/cuda --profile-top 15 \
        --json "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log" || rc=1
fi
if [[ " $STAGES " == *" interleave "* ]]; then
    # Throughput ratios that must resolve a few percent (shuffle overhead, kernel vs kernel): all rows resident and
    # their timed windows alternated, so machine drift between rows cancels. Activation memory only.
    echo "== benchmark, interleaved rows (batch $BATCH, $IMG px, bf16) =="
    python3 scripts/benchmark.py \
        deit_tiny_patch16_224 mambaout_femto \
        vim_tiny@backend=cuda,label=vim_tiny/cuda \
        shufflemamba_tiny@backend=cuda,label=shufflemamba_tiny/cuda \
        shufflemamba_tiny@backend=cuda,shuffle=off,label=shufflemamba_tiny/cuda/no-shuffle \
        --batch-size "$BATCH" --img-size "$IMG" --dtype bf16 --interleave --warmup 5 --iters 10 --repeats 5 \
        --json "$OUT/benchmark_interleaved.json" 2>&1 | tee "$OUT/benchmark_interleaved.log" || rc=1
fi
echo "gpu_check: exit $rc"
exit $rc
