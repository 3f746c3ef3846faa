#!/usr/bin/env bash
# session 7 call 2 (2xH200, one lane per GPU): the tf32 WY inverse (issue 13) and split projections (issue 20)
cd "$(dirname "$0")"
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax, jaxlib, flax, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'triton', triton.__version__)" > "$OUT/env.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/env.txt"
cat "$OUT/env.txt"
laneA() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 250 python3 benchmarks/delta_rule_sweep.py --ops gdn --budget 200 --check-all --labels default inverse_precision=tf32 wy_rows=64,inverse_precision=tf32 wy_rows=32,inverse_precision=tf32 --json "$OUT/sweep_tf32.json" > "$OUT/sweep_tf32.log" 2>&1
  timeout 200 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "gdn" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
}
laneB() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 benchmarks/train_step.py --preset tnl-1b --remat none --json "$OUT/tnl_fused.json" > "$OUT/tnl_fused.log" 2>&1
  timeout 200 python3 benchmarks/train_step.py --preset tnl-1b --remat none --split-projections --json "$OUT/tnl_split.json" > "$OUT/tnl_split.log" 2>&1
  timeout 120 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --split-projections --json "$OUT/gdn_split.json" > "$OUT/gdn_split.log" 2>&1
}
laneA & laneB & wait
echo "== sweep"; grep -E "^\{|^gdn" "$OUT/sweep_tf32.log" | cut -c1-400
echo "== gpu tests"; tail -n 6 "$OUT/gpu_tests.log"
for f in tnl_fused tnl_split gdn_split; do echo "== $f"; grep -E "row:|Error|error" "$OUT/$f.log" | tail -n 4; done
