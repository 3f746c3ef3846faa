#!/usr/bin/env bash
# session 20, call B (1xH200): the float32 fix (2 state stages; column blocks of at most 128, which the
# output kernels now walk under scalar gates too): the delta rule's default-config launch tests again,
# the compiled scalar-gate GPU cases, then sweep rows: GDN with the output kernels on 64 / 32 column
# blocks (new under scalar gates), KDA with 8 warps in wy_bwd alone and 16-column blocks
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "defaults_launch" -rA > $OUT/gpu_tests_defaults.log 2>&1
echo "== gpu tests defaults rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|RESOURCE" $OUT/gpu_tests_defaults.log | cut -c1-250 | tail -n 12
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "compiled_kernels_match_reference and (gdn or deltanet)" -rA > $OUT/gpu_tests_scalar.log 2>&1
echo "== gpu tests scalar rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests_scalar.log | cut -c1-250 | tail -n 14
timeout 140 python3 benchmarks/delta_rule_sweep.py --ops gdn --reps 8 --budget 110 --labels default block_cols=64 block_cols=32 "num_warps_output_bwd=4,store_scores=True,block_cols=32" --json $OUT/sweep_gdn_cols.json > $OUT/sweep_gdn_cols.log 2>&1
echo "== gdn cols rc=$?"; show $OUT/sweep_gdn_cols.log
timeout 140 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 110 --labels default "num_warps_bwd=8,num_warps_output_bwd=4" block_cols=16 --json $OUT/sweep_kda_warps.json > $OUT/sweep_kda_warps.log 2>&1
echo "== kda warps rc=$?"; show $OUT/sweep_kda_warps.log
