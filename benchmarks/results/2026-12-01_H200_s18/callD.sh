#!/usr/bin/env bash
# session 18, call D (1xH200): the new per-channel defaults (KDA: 4 forward warps, 2 backward stages
# on the factored tiles and 1 on the exact ones, the scalar gates' state-pass rule; GLA: 4 warps in the
# output and gradient kernels, 2 state stages): GPU tests both ways, KDA at the shapes beside
# jax-linear-attention, the state-pass rule at (4, 8K)
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py tests/pallas_kernels/test_gla_pallas.py -k "kda-docs or kda-strong or default or strong-gates" > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|^FAILED|Error" $OUT/gpu_tests.log | tail -n 8 | cut -c1-300
timeout 300 python3 benchmarks/delta_rule.py --ops kda --impls project jla --timeout 110 --json $OUT/delta_op.json > $OUT/delta_op.log 2>&1
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op.log | tail -n 10
timeout 110 python3 benchmarks/delta_rule_sweep.py --ops kda --shape 4,8192,16,128 --budget 80 --reps 8 --labels default splits=2 block_e=16 --json $OUT/sweep_kda_4x8k.json > $OUT/sweep_kda_4x8k.log 2>&1
echo "== kda (4, 8K) rc=$?"; grep -E '"label"' $OUT/sweep_kda_4x8k.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r['config'].get('splits'), r['config'].get('block_e'), r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"
