#!/usr/bin/env bash
# session 23, call E (1xH200): more rows around the new KDA default, 16 reps each (call D's default
# was 9.70 ms against call A's 9.45 with the same kernels: single rows within ~3% are not separable):
# the default twice (first and last), call D's two near-ties together, the output backward's warps,
# the state passes (value-block width, runs, warps, stages), scores not stored
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 480 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 16 --budget 400 --labels default inverse_precision=tf32,wy_bwd_split=True num_warps_output_bwd=8 block_e=32 splits=2 num_warps_state=8 num_stages_state=2 store_scores=False wy_bwd_split=True --json $OUT/kda_rows.json > $OUT/kda_rows.log 2>&1
echo "== kda rows rc=$?"; grep -E '^\{' $OUT/kda_rows.log | python3 -c "import sys, json; [print(r['label'], round(r.get('fwd_ms', 0), 3), round(r.get('fwd_bwd_ms', 0), 3), r.get('error', '')) for r in map(json.loads, sys.stdin)]"
timeout 60 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 16 --budget 50 --labels default --json $OUT/kda_default_again.json > $OUT/kda_default_again.log 2>&1
echo "== kda default again rc=$?"; grep -E '^\{' $OUT/kda_default_again.log | python3 -c "import sys, json; [print(r['label'], round(r.get('fwd_ms', 0), 3), round(r.get('fwd_bwd_ms', 0), 3)) for r in map(json.loads, sys.stdin)]"
