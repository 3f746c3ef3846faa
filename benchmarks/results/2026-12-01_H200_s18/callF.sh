#!/usr/bin/env bash
# session 18, call F (1xH200): where KDA's time goes with the new defaults (device time by kernel), and
# the whole new default on strong gates (the exact kernels behind the cond)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 110 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 6 --labels default --profile /tmp/prof --json $OUT/kda_profile.json > $OUT/kda_profile.log 2>&1
echo "== kda profile rc=$?"; grep -vE "^\{" $OUT/kda_profile.log | tail -n 40 | cut -c1-200
timeout 80 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 6 --gate-scale 200 --labels default --json $OUT/kda_strong.json > $OUT/kda_strong.log 2>&1
echo "== kda strong gates rc=$?"; show $OUT/kda_strong.log
