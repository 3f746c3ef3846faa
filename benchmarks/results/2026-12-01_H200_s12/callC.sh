#!/usr/bin/env bash
# session 12, call C (1xH200): KDA with 4 backward warps (the new default) against the stored
# inverse read by 16-row blocks and two more variants; the compiled kernels' GPU tests; the op
# beside jax-linear-attention (GDN and KDA, two of the shapes)
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 170 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default store_inverse=True num_stages_bwd=2 block_cols=64 --budget 140 --json $OUT/sweep_kda_c.json > $OUT/sweep_kda_c.log 2>&1
echo "== sweep rc=$?"; grep -E "^kda " $OUT/sweep_kda_c.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k kda > $OUT/gpu_tests_c.log 2>&1
echo "== gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests_c.log
timeout 230 python3 benchmarks/delta_rule.py --ops kda gdn --impls project jla --shapes 1,32768,16,128 4,8192,16,128 --timeout 60 --json $OUT/delta_op_c.json > $OUT/delta_op_c.log 2>&1
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op_c.log | tail -n 8
