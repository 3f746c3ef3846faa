#!/usr/bin/env bash
# session 7 call 1 (2xH200): delta-model rows (issue 14) and the softmax layer ratios (issue 18)
cd "$(dirname "$0")"
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, jaxlib, flax, optax, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'triton', triton.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
( CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/train_step.py --preset kda-1.3b --json "$OUT/kda13b.json" > "$OUT/kda13b.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --json "$OUT/gdn13b_none.json" > "$OUT/gdn13b_none.log" 2>&1 ) &
wait
for f in kda13b gdn13b_none; do echo "== $f"; grep -E "row:|OOM|Error|error" "$OUT/$f.log" | tail -n 8; done
timeout 250 python3 benchmarks/train_step.py --preset gdn-1.3b kda-1.3b --sp 2 --json "$OUT/delta_sp2.json" > "$OUT/delta_sp2.log" 2>&1
echo "== delta sp2"; grep -E "row:|OOM|Error|error" "$OUT/delta_sp2.log" | tail -n 8
timeout 110 python3 benchmarks/hybrid.py --sp 2 --json "$OUT/hybrid_layer.json" > "$OUT/hybrid_layer.log" 2>&1
echo "== hybrid layer"; grep -v "^\s*$" "$OUT/hybrid_layer.log" | grep -iv "warn" | tail -n 30
