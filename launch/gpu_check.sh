#!/usr/bin/env bash
# Prepared GPU check: loader and model throughput on one CUDA GPU, in one short run.
#
#   launch/gpu_check.sh [OUT_DIR]      (default OUT_DIR: ${OUT:-gpu_check})
#
# 1. `fdtrain bench data --device cuda`: the DALI mixed pipeline (nvJPEG decode, resize, flip,
#    normalize, X~ on the GPU) beside DALI CPU, the fallback and the naive baseline, on the same
#    299x299 data; target: dali-mixed+n >= 3000 images/s on one H100.
# 2. `fdtrain bench model` and `fdtrain bench train` when this fdtrain has them.
# Prints each table and writes the JSON lines to OUT_DIR. Exits 1 at once, with the reason,
# when no CUDA GPU (or no DALI) is visible. Environment: PYTHON (default .venv/bin/python or
# python3), GPU_CHECK_SAMPLES (default 4096), GPU_CHECK_BATCH (default 128).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SAMPLES=${GPU_CHECK_SAMPLES:-4096}
BATCH=${GPU_CHECK_BATCH:-128}

die() { echo "gpu_check: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: this machine has no NVIDIA driver; run on a GPU node"
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi finds no GPU: run on a GPU node"
"$PYTHON" - <<'EOF' || die "torch sees no CUDA GPU or DALI is missing (see above)"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False (CPU-only torch, or CUDA_VISIBLE_DEVICES hides the GPU)")
try:
    import nvidia.dali as dali
except ImportError:
    sys.exit("nvidia.dali is not installed: pip install 'fdtrain[dali]' (CUDA 13) or 'fdtrain[dali-cuda120]'")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, DALI {dali.__version__}",
      file=sys.stderr)
EOF

mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

echo "== fdtrain bench data --device cuda"
"$PYTHON" -m fdtrain bench data --device cuda --samples "$SAMPLES" --batch-size "$BATCH" --rounds 3 \
    --json "$OUT_DIR/bench_data.json"

# The other benches belong to other parts of fdtrain: run them only where they are built.
for bench in model train; do
    if "$PYTHON" -m fdtrain bench --help 2>/dev/null | grep -Eq "^ +$bench .*not built yet"; then
        echo "== fdtrain bench $bench: not built in this version, skipped"
        continue
    fi
    echo "== fdtrain bench $bench --device cuda"
    "$PYTHON" -m fdtrain bench "$bench" --device cuda --json "$OUT_DIR/bench_$bench.json" \
        || echo "gpu_check: fdtrain bench $bench failed (exit $?)" >&2
done

"$PYTHON" - "$OUT_DIR/bench_data.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
mixed = r.get("dali-mixed+n", {}).get("images_per_s")
print(f"gpu_check: DALI mixed (X and X~ at 299x299): {mixed:.0f} images/s (target >= 3000 on one H100)"
      if mixed else "gpu_check: no dali-mixed row in the data bench")
EOF
echo "gpu_check: results in $OUT_DIR/"
