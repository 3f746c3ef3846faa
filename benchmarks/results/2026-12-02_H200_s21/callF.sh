#!/usr/bin/env bash
# session 21, call F (1xH200): KDA's chunk-local cumulative gates by a Pallas kernel
# (BlockConfig.cumsum_kernel) against XLA's cumsum (the default), (1, 32768, 16, 128) bf16, with device
# time by kernel; then its GPU test against the token recurrence
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 10 --budget 170 --profile /tmp/prof --labels default cumsum_kernel=True --json $OUT/sweep_cumsum.json > $OUT/sweep_cumsum.log 2>&1
echo "== cumsum rc=$?"; show $OUT/sweep_cumsum.log; grep -vE "^\{" $OUT/sweep_cumsum.log | grep -E "device time|fusion|cumsum|Pallas kernels" | cut -c1-140 | head -40
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "cumsum and compiled" -rA > $OUT/gpu_test_cumsum.log 2>&1
echo "== gpu test rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_test_cumsum.log | cut -c1-200 | tail -n 4
