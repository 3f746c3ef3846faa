#!/usr/bin/env bash
# session 14, call D (1xH200): GDN's output backward with 4 warps (BlockConfig.num_warps_output_bwd;
# ptxas: 255 registers, two programs per SM, 64 B of spills, 20 B with stored scores) and the WY
# kernels on 32-column blocks (wy_bwd 12 B of spills against 76), profiled by kernel
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
export PYTHONPATH=$PWD
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default num_warps_output_bwd=4 num_warps_output_bwd=4,store_scores=True block_cols=32 num_warps_output_bwd=4,store_scores=True,block_cols=32 --budget 150 --check --profile $OUT/prof --json $OUT/sweep_gdn_d.json > $OUT/sweep_gdn_d.log 2>&1
echo "== sweep gdn rc=$?"; grep -E "^gdn |Error|gated_delta_rule_(wy|output)|device time" $OUT/sweep_gdn_d.log | cut -c1-160
rm -rf $OUT/prof
