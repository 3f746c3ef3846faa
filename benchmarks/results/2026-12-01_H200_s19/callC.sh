#!/usr/bin/env bash
# session 19, call C (1xH200): the new per-channel defaults (pregated state passes) beside
# jax-linear-attention's KDA in one run; kda-1.3b with bounded gates; float32 and fp16 KDA rows
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT /tmp/site
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('dtype'), r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 280 python3 benchmarks/delta_rule.py --ops kda --impls project jla --timeout 100 --json $OUT/delta_op.json > $OUT/delta_op.log 2>&1
echo "== delta op rc=$?"; grep -vE "^\{" $OUT/delta_op.log | tail -n 12 | cut -c1-200
PYTHONPATH=$PWD timeout 200 python3 benchmarks/train_step.py --preset kda-1.3b --iters 6 --gate-lower-bound -5 --json $OUT/kda13b_bound5.json > $OUT/kda13b_bound5.log 2>&1
echo "== kda-1.3b bound -5 rc=$?"; grep -E "row:|Error|ms" $OUT/kda13b_bound5.log | tail -n 4 | cut -c1-250
PYTHONPATH=$PWD timeout 140 python3 benchmarks/delta_rule_sweep.py --ops kda --dtype float32 --reps 6 --budget 100 --labels default pregated_state=True num_warps=4 --json $OUT/sweep_kda_f32.json > $OUT/sweep_kda_f32.log 2>&1
echo "== kda f32 rc=$?"; show $OUT/sweep_kda_f32.log
PYTHONPATH=$PWD timeout 70 python3 benchmarks/delta_rule_sweep.py --ops kda --dtype float16 --reps 6 --budget 40 --labels default --json $OUT/sweep_kda_f16.json > $OUT/sweep_kda_f16.log 2>&1
echo "== kda f16 rc=$?"; show $OUT/sweep_kda_f16.log
