#!/bin/bash
# The GPU table of issue 15 in one run of under 8 minutes: mesp, mebp, autodiff and mlx-lm's own LoRA trainer on
# random-weight 4-bit models of Qwen2.5-0.5B's and Llama-3.2-3B's shapes, T = 1024 and 4096, batch 1, rank 8 on all
# seven projections; MLX peak, seconds per step, host syncs and kernels (compute primitives) per step, the loss
# checked against mesp's, the card named. Autodiff runs on the 0.5B shape only (on 3B at T=4096 it needs tens of GB
# and minutes; issue 15 left it out too).
#
# On the GPU machine, from the project root, once MLX's CUDA backend is installed
# (`pip install mlx[cuda]` at the locked mlx version):
#     bash tools/gpu_bench.sh [OUTDIR]          (default: $OUT when set, else ./gpu-bench)
# Writes OUTDIR/card.txt, OUTDIR/{qwen,llama}.{json,md,log}. Each part has its own time limit, so a slow part
# leaves the others' rows; bench_memory exits non-zero when a row FAILS its loss check, reported, not fatal here.
set -u
cd "$(dirname "$0")/.."
source .gpu/b/env.sh
out=${1:-${OUT:-gpu-bench}}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())"
} | tee "$out/card.txt"
t0=$(date +%s)
part() {  # name, seconds, models, methods
  timeout "$2" python3 tools/bench_memory.py --models "$3" --seqs 1024 4096 --ranks 8 --methods $4 \
    --steps 2 --warmup 1 --timeout 110 --json "$out/$1.json" --markdown "$out/$1.md" > "$out/$1.log" 2>&1
  echo "$1: exit $? after $(( $(date +%s) - t0 )) s"
  tail -n 12 "$out/$1.log"
}
part qwen 200 preset:qwen2.5-0.5b "mesp mebp autodiff mlx-lm"
part llama 260 preset:llama-3.2-3b "mesp mebp mlx-lm"
