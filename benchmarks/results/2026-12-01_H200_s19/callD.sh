#!/usr/bin/env bash
# session 19, call D (1xH200): float32 per-channel defaults (call C: the former KDA float32 default
# did not launch, 248 KB of shared memory), now pregated; GLA beside jax-linear-attention in one run
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT /tmp/site
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=$PWD
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('dtype'), r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 70 python3 benchmarks/delta_rule_sweep.py --ops kda --dtype float32 --shape 1,4096,16,128 --reps 4 --budget 40 --labels default --json $OUT/sweep_kda_f32.json > $OUT/sweep_kda_f32.log 2>&1
echo "== kda f32 (1,4K) rc=$?"; show $OUT/sweep_kda_f32.log
timeout 100 python3 benchmarks/gla_sweep.py --dtype float32 --shape 1,8192,16,128 --reps 4 --budget 60 --labels default pregated_state --json $OUT/gla_f32.json > $OUT/gla_f32.log 2>&1
echo "== gla f32 (1,8K) rc=$?"; show $OUT/gla_f32.log
PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/kernels.py --impls project jla --decay channel --impl pallas --shapes 1,32768,16,128 --timeout 70 --json $OUT/gla_peer.json > $OUT/gla_peer.log 2>&1
echo "== gla vs jla rc=$?"; grep -vE "^\{" $OUT/gla_peer.log | tail -n 12 | cut -c1-220
