#!/usr/bin/env bash
# session 17, call D (1xH200): per-channel diagonal tiles factored around their middle row when every
# tile of the input allows it (one lax.cond on the gates around the kernels, exact kernels otherwise):
# KDA GPU tests (bounded gates; gates down to -7 per token), KDA beside jax-linear-attention, and
# KDA with strong gates (the exact kernels behind the cond)
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 140 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "kda-docs or kda-strong" > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|^FAILED|Error" $OUT/gpu_tests.log | tail -n 8 | cut -c1-300
timeout 170 python3 benchmarks/delta_rule.py --ops kda --impls project jla --shapes 1,32768,16,128 4,8192,16,128 --timeout 75 --json $OUT/delta_op.json > $OUT/delta_op.log 2>&1
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op.log | tail -n 8
timeout 75 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 6 --labels default --gate-scale 200 --json $OUT/sweep_kda_strong.json > $OUT/sweep_kda_strong.log 2>&1
echo "== strong rc=$?"; grep -E "^kda " $OUT/sweep_kda_strong.log | cut -c1-300
