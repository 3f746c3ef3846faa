#!/usr/bin/env bash
# session 19, call A (1xH200): KDA's state passes on gated keys / queries formed once in XLA
# (BlockConfig.pregated_state, session 18, CPU-tested only): its GPU test, then the sweep rows beside
# the default with device time by kernel
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "kda-pregated" > $OUT/gpu_tests_pregated.log 2>&1
echo "== gpu tests pregated rc=$?"; tail -n 3 $OUT/gpu_tests_pregated.log | cut -c1-300
timeout 330 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 280 --profile /tmp/prof --labels default pregated_state=True pregated_state=True,block_e=32 pregated_state=True,num_stages_state=2 --json $OUT/sweep_kda_pregated.json > $OUT/sweep_kda_pregated.log 2>&1
echo "== kda pregated rc=$?"; show $OUT/sweep_kda_pregated.log; grep -vE "^\{" $OUT/sweep_kda_pregated.log | grep -E "state|wy|output|fusion|total|device|==|kda " | cut -c1-160 | head -80
