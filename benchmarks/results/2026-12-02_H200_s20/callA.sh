#!/usr/bin/env bash
# session 20, call A (1xH200): the 9 default-config launch tests queued in session 19 (float32 at head
# dim 128, bf16 and float32 at 256; GDN, KDA, GLA), then every delta-rule / GLA GPU test, then the
# GDN and KDA defaults with device time by kernel (the baseline for this session's kernel work)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "defaults_launch" -rA > $OUT/gpu_tests_defaults.log 2>&1
echo "== gpu tests defaults rc=$?"; grep -E "PASS|FAIL|ERROR|passed|failed" $OUT/gpu_tests_defaults.log | cut -c1-300 | tail -n 25
timeout 150 python3 benchmarks/delta_rule_sweep.py --ops gdn kda --reps 8 --budget 120 --profile /tmp/prof --labels default --json $OUT/sweep_default.json > $OUT/sweep_default.log 2>&1
echo "== default profile rc=$?"; show $OUT/sweep_default.log; grep -vE "^\{" $OUT/sweep_default.log | grep -E "state|wy|output|fusion|total|device|==|kda |gdn |transition" | cut -c1-160 | head -60
