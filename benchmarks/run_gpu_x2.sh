#!/usr/bin/env bash
# Every multi-GPU measurement in one call, for a 2-GPU host (nvidia-h200-x2):
#   sequence-parallel strategies, the TNL-1B train step at sp=1 and sp=2, the hybrid softmax layer.
# Writes logs and JSON under $OUT (default runs/gpu). Uses the machine's python3 with PYTHONPATH=$PWD.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
timeout 210 python3 benchmarks/sequence_parallel.py --latency-hiding --json "$OUT/sp.json" > "$OUT/sp.log" 2>&1
timeout 170 python3 benchmarks/train_step.py --sp 1 2 --json "$OUT/train.json" > "$OUT/train.log" 2>&1
timeout 100 python3 benchmarks/hybrid.py --json "$OUT/hybrid.json" > "$OUT/hybrid.log" 2>&1
cat "$OUT/env.txt"
for f in sp train hybrid; do echo "== $f"; tail -n 25 "$OUT/$f.log"; done
