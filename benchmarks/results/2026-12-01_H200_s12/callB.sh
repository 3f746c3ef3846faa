#!/usr/bin/env bash
# session 12, call B (1xH200): per-channel diagonal tiles: the pair tensor in the products, the
# levels in their cotangents; KDA default and column-block / warp variants, a per-kernel profile
# of the default, the compiled kernels' GPU tests
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default block_cols=64 num_warps_bwd=4 num_stages_bwd=2 "block_cols=64,num_warps_bwd=4" --budget 170 --json $OUT/sweep_kda_b.json > $OUT/sweep_kda_b.log 2>&1
echo "== sweep rc=$?"; grep -E "^kda " $OUT/sweep_kda_b.log
timeout 120 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default --profile $OUT/prof --json $OUT/prof_kda.json > $OUT/prof_kda.log 2>&1
echo "== profile rc=$?"; grep -vE "^\{" $OUT/prof_kda.log | head -40
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k kda > $OUT/gpu_tests_b.log 2>&1
echo "== gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests_b.log
rm -rf $OUT/prof
