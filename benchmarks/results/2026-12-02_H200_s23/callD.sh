#!/usr/bin/env bash
# session 23, call D (1xH200): launch parameters and forms around the new KDA default (32-row output /
# WY-backward tiles): 8 warps in the WY backward (offline ptxas: fewer spills), the tf32 inverse in
# wy, the two-kernel WY backward, 64-column blocks; the default in the same run. No profile.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 520 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 430 --labels default num_warps_bwd=8,num_warps_output_bwd=4 inverse_precision=tf32 wy_bwd_split=True block_cols=64 --json $OUT/kda_launch.json > $OUT/kda_launch.log 2>&1
echo "== kda launch rows rc=$?"; grep -E '^\{' $OUT/kda_launch.log | python3 -c "import sys, json; [print(r['label'], round(r.get('fwd_ms', 0), 3), round(r.get('fwd_bwd_ms', 0), 3), r.get('error', '')) for r in map(json.loads, sys.stdin)]"
