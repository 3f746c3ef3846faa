#!/usr/bin/env bash
# session 23, call B (1xH200): bf16 KDA's new default (32-row output / WY-backward tiles behind a
# three-way gate switch): GPU tests of each branch, then the op beside jax-linear-attention at the
# issue's three shapes
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
timeout 230 env PYTHONPATH=$PWD python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "each_gate_case or 32-row or cumsum-kernel" -rA > $OUT/gpu_tests_kda.log 2>&1
echo "== gpu tests kda rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests_kda.log | cut -c1-200 | tail -n 8
timeout 320 env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/delta_rule.py --ops kda --impls project jla --timeout 100 --json $OUT/delta_op.json > $OUT/delta_op.log 2>&1
echo "== delta op rc=$?"; grep -vE "^\{" $OUT/delta_op.log | tail -n 6 | cut -c1-200
