#!/usr/bin/env bash
# session 13, call A (1xH200): GDN with 128-token chunks (half the sequential steps of the state
# passes) against the default; GPU tests of the gated-delta-rule and GLA kernels after session 12's
# refactors; the GLA op with its backward's diagonal cotangents by levels (untimed since)
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L; python3 -c "import jax, triton; print(jax.__version__, triton.__version__)"
timeout 260 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default chunk=128 chunk=128,num_stages_state=2 chunk=128,wy_rows=128 chunk=128,block_e=32 chunk=32 --budget 200 --check-all --json $OUT/sweep_gdn_a.json > $OUT/sweep_gdn_a.log 2>&1
echo "== sweep rc=$?"; grep -E "^gdn |Error|error" $OUT/sweep_gdn_a.log | cut -c1-400
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py tests/pallas_kernels/test_gla_pallas.py > $OUT/gpu_tests_a.log 2>&1
echo "== gpu tests rc=$?"; tail -n 4 $OUT/gpu_tests_a.log
timeout 140 python3 benchmarks/gla_sweep.py --labels default --budget 110 --json $OUT/gla_sweep_a.json > $OUT/gla_sweep_a.log 2>&1
echo "== gla sweep rc=$?"; tail -n 8 $OUT/gla_sweep_a.log | cut -c1-400
