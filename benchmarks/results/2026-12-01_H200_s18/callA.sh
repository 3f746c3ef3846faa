#!/usr/bin/env bash
# session 18, call A (1xH200): GLA's whole-input dispatch (session 17, CPU-tested only) on the GPU:
# its GPU tests (bounded gates: the factored kernels; gates down to -7: the exact ones) and a sweep of
# its launch parameters on the factored kernels
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py -k "default or strong-gates or one-run" > $OUT/gpu_tests_gla.log 2>&1
echo "== gla gpu tests rc=$?"; grep -E "passed|failed|^FAILED|Error" $OUT/gpu_tests_gla.log | tail -n 8 | cut -c1-300
timeout 300 python3 benchmarks/gla_sweep.py --reps 8 --budget 240 --check --labels default grads_warps=4 output_warps=4 block_cols=64 block_cols=16 split_grads,recompute_dz state_stages=2 --json $OUT/gla_sweep.json > $OUT/gla_sweep.log 2>&1
echo "== gla sweep rc=$?"; tail -n 25 $OUT/gla_sweep.log | cut -c1-250
