#!/usr/bin/env bash
# session 24, call C (1xH200): the WY inverse's products on bf16 operands (inverse_precision="bf16"):
# its GPU tests (GDN and KDA defaults with it), then the sweep rows beside each default
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "bf16_inverse" -rA > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log | cut -c1-200 | tail -n 4
timeout 120 python3 benchmarks/delta_rule_sweep.py --ops gdn --reps 16 --budget 100 --labels default inverse_precision=bf16 --json "$OUT/gdn_bf16_inverse.json" > "$OUT/gdn_bf16_inverse.log" 2>&1
echo "== gdn rc=$?"; grep -E '^\{' "$OUT/gdn_bf16_inverse.log" | python3 -c "import sys,json; [print(r.get('label'), r.get('fwd_ms'), r.get('fwd_bwd_ms'), r.get('error', '')) for r in map(json.loads, sys.stdin)]"
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 16 --budget 170 --labels default inverse_precision=bf16 channel_rows=32,inverse_precision=bf16 --json "$OUT/kda_bf16_inverse.json" > "$OUT/kda_bf16_inverse.log" 2>&1
echo "== kda rc=$?"; grep -E '^\{' "$OUT/kda_bf16_inverse.log" | python3 -c "import sys,json; [print(r.get('label'), r.get('fwd_ms'), r.get('fwd_bwd_ms'), r.get('error', '')) for r in map(json.loads, sys.stdin)]"
