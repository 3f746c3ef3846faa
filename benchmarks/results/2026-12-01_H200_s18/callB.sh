#!/usr/bin/env bash
# session 18, call B (1xH200): KDA's launch parameters and column blocks on the factored diagonal
# tiles (session 17 kept the old ones), then GLA's combinations of call A's two winners
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 400 python3 benchmarks/delta_rule_sweep.py --ops kda --budget 330 --reps 8 --labels default num_warps_bwd=8 num_warps=4 block_cols=64 block_cols=128 num_warps_output_bwd=8 num_warps_bwd=8,num_warps_output_bwd=4 wy_bwd_split=True num_stages_bwd=2 splits=1,block_e=16 --json $OUT/sweep_kda.json > $OUT/sweep_kda.log 2>&1
echo "== kda sweep rc=$?"; grep -E '"label"' $OUT/sweep_kda.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"
timeout 170 python3 benchmarks/gla_sweep.py --reps 8 --budget 130 --check --labels grads_warps=4,block_cols=64 grads_warps=4,block_cols=64,output_warps=4 grads_warps=4,output_warps=4 grads_warps=4,block_cols=128 --json $OUT/gla_sweep.json > $OUT/gla_sweep.log 2>&1
echo "== gla sweep rc=$?"; tail -n 8 $OUT/gla_sweep.log | cut -c1-250
