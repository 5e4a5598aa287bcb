#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md, side by side in one run on one machine: HF transformers
# (eager, bf16) and `muse bench` on the same shapes; for Qwen2.5-1.5B on the very same random
# weights, with our logits and greedy tokens checked against transformers'.
#
# Usage: gpu_side_by_side.sh MUSE_BINARY OUT_DIR [SHAPE...]   (default shapes: 1.5B and 7B)
# Needs: an NVIDIA GPU, Python with torch + transformers, a muse built with `--features cuda`.
set -euo pipefail
MUSE=$1
OUT=$2
shift 2
SHAPES=${*:-qwen2.5-1.5b qwen2.5-7b}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/mm-gpu-bench}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for shape in $SHAPES; do
  if [ "$shape" = qwen2.5-1.5b ]; then
    # Same weights for both: transformers builds and saves them, we load them.
    python3 "$HERE/hf_gpu_reference.py" --shape "$shape" --save-dir "$WORK/$shape" \
      --reference "$OUT/$shape.reference.json" | tee "$OUT/$shape.hf.json"
    "$MUSE" bench --weights "$WORK/$shape" --reference "$OUT/$shape.reference.json" \
      --device cuda:0 --decode-tokens 64 --repeats 3 --batch 8 --json | tee "$OUT/$shape.muse.json"
  else
    # Too big to save and reload within a benchmark run: random weights on each side.
    python3 "$HERE/hf_gpu_reference.py" --shape "$shape" | tee "$OUT/$shape.hf.json"
    "$MUSE" bench --shape "$shape" --device cuda:0 --decode-tokens 64 --repeats 3 --batch 8 \
      --json | tee "$OUT/$shape.muse.json"
  fi
done
