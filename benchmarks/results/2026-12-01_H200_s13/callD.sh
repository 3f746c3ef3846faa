#!/usr/bin/env bash
# session 13, call D (1xH200, call C's warm machine): with the cheaper state-pass steps, the value
# blocks, warps and splits of the state passes again; the gdn-1.3b training step on one GPU
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
export PYTHONPATH=$PWD
timeout 190 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default block_e=32 block_e=16,num_warps_state=2 splits=2 num_stages_state=2 num_warps_state=8 --budget 150 --json $OUT/sweep_gdn_d.json > $OUT/sweep_gdn_d.log 2>&1
echo "== sweep gdn rc=$?"; grep -E "^gdn |Error" $OUT/sweep_gdn_d.log | cut -c1-300
timeout 250 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 --json $OUT/gdn_step_d.json > $OUT/gdn_step_d.log 2>&1
echo "== gdn step rc=$?"; grep -E "row:|Error|MFU|ms" $OUT/gdn_step_d.log | tail -n 5
