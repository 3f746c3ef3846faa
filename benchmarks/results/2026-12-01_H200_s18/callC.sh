#!/usr/bin/env bash
# session 18, call C (1xH200): call B's KDA winners combined (4 forward warps, 2 backward stages, one
# run of 16-wide value blocks); each winner on the exact kernels (gates x200, behind the cond); GLA's
# winner on the exact kernels and with stages
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 220 python3 benchmarks/delta_rule_sweep.py --ops kda --budget 170 --reps 8 --base num_warps=4 num_stages_bwd=2 --labels default splits=1,block_e=16 num_stages_state=2 --json $OUT/sweep_kda_combo.json > $OUT/sweep_kda_combo.log 2>&1
echo "== kda combos (base num_warps=4 num_stages_bwd=2) rc=$?"; show $OUT/sweep_kda_combo.log
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --budget 150 --reps 6 --gate-scale 200 --labels default num_warps=4 num_stages_bwd=2 --json $OUT/sweep_kda_strong.json > $OUT/sweep_kda_strong.log 2>&1
echo "== kda strong gates rc=$?"; show $OUT/sweep_kda_strong.log
timeout 130 python3 benchmarks/gla_sweep.py --reps 6 --budget 100 --gate-scale 200 --labels default grads_warps=4,output_warps=4 --json $OUT/gla_strong.json > $OUT/gla_strong.log 2>&1
echo "== gla strong gates rc=$?"; tail -n 4 $OUT/gla_strong.log | cut -c1-200
timeout 100 python3 benchmarks/gla_sweep.py --reps 8 --budget 70 --labels grads_warps=4,output_warps=4,state_stages=2 grads_warps=4,output_warps=4,grads_stages=2 --json $OUT/gla_stages.json > $OUT/gla_stages.log 2>&1
echo "== gla stages rc=$?"; tail -n 4 $OUT/gla_stages.log | cut -c1-200
