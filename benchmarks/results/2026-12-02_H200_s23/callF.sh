#!/usr/bin/env bash
# session 23, call F (1xH200): 32-row tiles in every KDA kernel (channel_rows=32; session 22 call E:
# wy doubled with its float32 inverse of 32-row diagonal blocks), with the inverse's products in tf32,
# against the default (32-row output / WY-backward tiles only). 16 reps, no profile.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 230 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 16 --budget 200 --labels default channel_rows=32 channel_rows=32,inverse_precision=tf32 --json $OUT/kda_rows32_tf32.json > $OUT/kda_rows32_tf32.log 2>&1
echo "== kda rows rc=$?"; grep -E '^\{' $OUT/kda_rows32_tf32.log | python3 -c "import sys, json; [print(r['label'], round(r.get('fwd_ms', 0), 3), round(r.get('fwd_bwd_ms', 0), 3), r.get('error', '')) for r in map(json.loads, sys.stdin)]"
