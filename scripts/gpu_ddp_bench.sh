#!/usr/bin/env bash
# DDP / FSDP2 scaling benchmark on one multi-GPU host: the numbers for the README's scaling table.
#
#   bash scripts/gpu_ddp_bench.sh                    # every visible GPU: nproc 1, 2, 4, ... up to their count
#   MAX_NPROC=2 bash scripts/gpu_ddp_bench.sh        # 2 x H200: nproc 1 and 2 (about 4 minutes)
#   MAX_NPROC=4 BACKEND=fast bash scripts/gpu_ddp_bench.sh
#
# Environment: OUT (result folder, default outputs/ddp_bench), MAX_NPROC, BACKEND (cuda | fast | auto; default cuda),
# BATCH (per GPU, default 128), GRID (full | oat, default full), MODELS (default shufflemamba_tiny shufflemamba_base),
# WARMUP / ITERS / REPEATS (default 3 / 5 / 3: few steps, so the whole script stays within ~5 minutes on 2 GPUs).
# Writes $OUT/ddp_bench.json (rows, environment, table), $OUT/ddp_bench.log, $OUT/topology.txt and
# $OUT/fsdp2_gpu_test.txt (FSDP2 through torchrun train.py on 2 GPUs vs DDP, then a resume).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/ddp_bench}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
MAX_NPROC=${MAX_NPROC:-$GPUS}
BACKEND=${BACKEND:-cuda}
BATCH=${BATCH:-128}
GRID=${GRID:-full}
MODELS=${MODELS:-shufflemamba_tiny shufflemamba_base}
WARMUP=${WARMUP:-3}
ITERS=${ITERS:-5}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"

if [ "$MAX_NPROC" -gt "$GPUS" ]; then
  echo "MAX_NPROC=$MAX_NPROC but only $GPUS GPU(s) visible" >&2
  exit 2
fi
# 1, 2, 4, ... up to MAX_NPROC, and MAX_NPROC itself (e.g. 1 2 3 for three GPUs)
NPROCS=""
n=1
while [ "$n" -le "$MAX_NPROC" ]; do NPROCS="$NPROCS $n"; n=$((n * 2)); done
case " $NPROCS " in *" $MAX_NPROC "*) ;; *) NPROCS="$NPROCS $MAX_NPROC" ;; esac
echo "process counts:$NPROCS | backend $BACKEND | batch $BATCH per GPU | grid $GRID | models $MODELS"

nvidia-smi topo -m > "$OUT/topology.txt" 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT/topology.txt" 2>&1 || true

# shellcheck disable=SC2086  # NPROCS and MODELS are word lists on purpose
timeout "${BENCH_TIMEOUT:-480}" python scripts/benchmark_ddp.py $MODELS --nproc $NPROCS --batch-size "$BATCH" \
    --backend "$BACKEND" --grid "$GRID" --warmup "$WARMUP" --iters "$ITERS" --repeats "$REPEATS" --gpu-warmup-s 2 \
    --json "$OUT/ddp_bench.json" 2>&1 | tee "$OUT/ddp_bench.log"
bench_status=${PIPESTATUS[0]}

test_status=0
if [ "$MAX_NPROC" -ge 2 ]; then
  timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -rs tests/gpu/test_fsdp2_gpu.py 2>&1 | tee "$OUT/fsdp2_gpu_test.txt"
  test_status=${PIPESTATUS[0]}
fi
echo "benchmark exit status $bench_status, FSDP2 GPU test exit status $test_status"
[ "$bench_status" -eq 0 ] && [ "$test_status" -eq 0 ]
