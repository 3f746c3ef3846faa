#!/usr/bin/env bash
# session 22, call C (1xH200): KDA (call B's changes) beside jax-linear-attention at the three
# shapes in one run; GLA with its pregated cumulative gates by the delta rule's kernel: GPU tests and
# its default timed
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
timeout 120 env PYTHONPATH=$PWD python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py -k "pregated or bfloat16-256 or match_reference and default" -rA > $OUT/gpu_tests_gla.log 2>&1
echo "== gla gpu tests rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests_gla.log | cut -c1-200 | tail -n 6
timeout 100 env PYTHONPATH=$PWD python3 benchmarks/gla_sweep.py --reps 8 --budget 70 --labels default --json $OUT/gla.json > $OUT/gla.log 2>&1
echo "== gla rc=$?"; tail -n 2 $OUT/gla.log | cut -c1-200
timeout 300 env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/delta_rule.py --ops kda --impls project jla --timeout 100 --json $OUT/delta_op.json > $OUT/delta_op.log 2>&1
echo "== delta op rc=$?"; grep -vE "^\{" $OUT/delta_op.log | tail -n 12 | cut -c1-200
