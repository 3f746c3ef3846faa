#!/usr/bin/env bash
# session 13, call E (1xH200): KDA's backward warps and column blocks again now that its WY
# backward reads the stored inverse and forms no Gram block
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
export PYTHONPATH=$PWD
timeout 300 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default num_warps_bwd=8 block_cols=64 block_cols=16 --budget 240 --json $OUT/sweep_kda_e.json > $OUT/sweep_kda_e.log 2>&1
echo "== sweep kda rc=$?"; grep -E "^kda |Error" $OUT/sweep_kda_e.log | cut -c1-300
