#!/usr/bin/env bash
# Every multi-GPU measurement still open, in one call, for a 2-GPU host (nvidia-h200-x2):
#   sequence-parallel strategies (the split-kernel LASP path), the hybrid model's train step
#   (sp=2 vs one GPU, both softmax strategies), the softmax layer alone on the Pallas kernels.
# Writes logs and JSON under $OUT (default runs/gpu). Uses the machine's python3 with PYTHONPATH=$PWD.
# Budget: about 9 minutes (the sp step also profiles each strategy: device time by kernel); each step has its own time limit and its output is kept if a later one fails.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
timeout 230 python3 benchmarks/sequence_parallel.py --latency-hiding --profile /tmp/sp_profile --json "$OUT/sp.json" > "$OUT/sp.log" 2>&1
timeout 200 python3 benchmarks/hybrid.py --workload tnl-hybrid --sp 2 --json "$OUT/hybrid_model.json" > "$OUT/hybrid_model.log" 2>&1
timeout 100 python3 benchmarks/hybrid.py --sp 2 --json "$OUT/hybrid_layer.json" > "$OUT/hybrid_layer.log" 2>&1
cat "$OUT/env.txt"
for f in sp hybrid_model hybrid_layer; do echo "== $f"; grep -v "^\s*$" "$OUT/$f.log" | grep -iv "warn" | tail -n 60; done
