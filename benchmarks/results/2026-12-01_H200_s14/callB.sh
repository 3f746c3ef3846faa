#!/usr/bin/env bash
# session 14, call B (1xH200): GDN with 4 forward warps as the default; the state passes with
# wider value blocks split into runs (jla walks 4 pieces of 64-wide blocks), profiled by kernel;
# the op beside jax-linear-attention at the three shapes
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 270 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default block_e=32 block_e=64 splits=2 splits=4 block_e=64,splits=4 block_e=32,splits=2 block_e=32,splits=4 block_e=64,splits=2 block_e=64,splits=4,num_warps_state=8 --budget 220 --check --profile $OUT/prof --json $OUT/sweep_gdn_b.json > $OUT/sweep_gdn_b.log 2>&1
echo "== sweep gdn rc=$?"; grep -E "^gdn |Error|gated_delta_rule_|device time" $OUT/sweep_gdn_b.log | cut -c1-160
rm -rf $OUT/prof
timeout 280 python3 benchmarks/delta_rule.py --ops gdn kda --impls project jla --timeout 90 --json $OUT/delta_op_b.json > $OUT/delta_op_b.log 2>&1
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op_b.log | tail -n 14
