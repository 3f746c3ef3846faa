#!/usr/bin/env bash
# session 19, call B (1xH200): GLA's state passes on gated keys / queries formed once
# (ChannelConfig.pregated_state, new): GPU tests, sweep rows with fewer runs; KDA's state-pass rule
# again now that its steps are cheaper (pregated_state is the bf16/fp16 KDA default since call A)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "pregated" > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests.log | cut -c1-300
timeout 260 python3 benchmarks/gla_sweep.py --reps 8 --budget 200 --check --labels default pregated_state pregated_state,splits=1,block_e=16 pregated_state,splits=2 pregated_state,splits=2,block_e=16 pregated_state,state_stages=3 --json $OUT/gla_sweep.json > $OUT/gla_sweep.log 2>&1
echo "== gla sweep rc=$?"; tail -n 12 $OUT/gla_sweep.log | cut -c1-250
timeout 170 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 130 --labels default block_e=32 num_stages_state=2 splits=2 --json $OUT/sweep_kda.json > $OUT/sweep_kda.log 2>&1
echo "== kda sweep rc=$?"; show $OUT/sweep_kda.log
