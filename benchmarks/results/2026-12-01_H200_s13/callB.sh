#!/usr/bin/env bash
# session 13, call B (1xH200): the WY backward without Gram blocks when it reads the forward's
# stored inverse (A as the gated product of β ⊙ K and K, so dβ comes from the row operand's
# cotangent): KDA default against store_inverse=True, GDN default, each with a profile by kernel;
# then the compiled kernels' GPU tests
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
export PYTHONPATH=$PWD
timeout 220 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default store_inverse=True --budget 180 --check-all --profile $OUT/prof --json $OUT/sweep_kda_b.json > $OUT/sweep_kda_b.log 2>&1
echo "== sweep kda rc=$?"; grep -E "^kda |device|Error" $OUT/sweep_kda_b.log | cut -c1-300
timeout 100 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default --budget 60 --profile $OUT/prof --json $OUT/sweep_gdn_b.json > $OUT/sweep_gdn_b.log 2>&1
echo "== sweep gdn rc=$?"; grep -E "^gdn |Error" $OUT/sweep_gdn_b.log | cut -c1-300
timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py > $OUT/gpu_tests_b.log 2>&1
echo "== gpu tests rc=$?"; tail -n 4 $OUT/gpu_tests_b.log
