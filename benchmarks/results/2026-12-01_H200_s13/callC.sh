#!/usr/bin/env bash
# session 13, call C (1xH200): the state passes with per-row gates applied to the [C, block_e]
# products instead of the [C, D] key / query tiles (common.gated_dot), and KDA's stored inverse as
# its default: GDN default with a profile by kernel; the compiled kernels' GPU tests; the op beside
# jax-linear-attention (GDN and KDA, two of the shapes)
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 100 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default --budget 60 --check --profile $OUT/prof --json $OUT/sweep_gdn_c.json > $OUT/sweep_gdn_c.log 2>&1
echo "== sweep gdn rc=$?"; grep -E "^gdn |Error|gated_delta_rule_" $OUT/sweep_gdn_c.log | cut -c1-300
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py > $OUT/gpu_tests_c.log 2>&1
echo "== gpu tests rc=$?"; tail -n 4 $OUT/gpu_tests_c.log
timeout 230 python3 benchmarks/delta_rule.py --ops gdn kda --impls project jla --shapes 1,32768,16,128 4,8192,16,128 --timeout 60 --json $OUT/delta_op_c.json > $OUT/delta_op_c.log 2>&1
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op_c.log | tail -n 10
