#!/usr/bin/env bash
# session 14, call E (1xH200): the new bf16 default (4 warps in the forward chunk kernels and in
# output_bwd): the scalar-gate kernels' GPU tests, then the op beside jax-linear-attention at the
# issue's three shapes (GDN)
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "gdn or deltanet" > $OUT/gpu_tests_e.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|Error" $OUT/gpu_tests_e.log | tail -n 8
timeout 200 python3 benchmarks/delta_rule.py --ops gdn --impls project jla --timeout 80 --json $OUT/delta_op_e.json > $OUT/delta_op_e.log 2>&1
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op_e.log | tail -n 6
