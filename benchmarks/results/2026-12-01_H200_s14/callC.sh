#!/usr/bin/env bash
# session 14, call C (1xH200): the WY backward forming dW = −dV' hᵀ once (it formed it in both of
# its loops); GDN stored scores, the two-kernel WY backward and 2 backward stages again under the
# new defaults, profiled; the compiled scalar-gate kernels' GPU tests; gdn-1.3b training step with
# 4 forward warps
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 150 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default store_scores=True wy_bwd_split=True num_stages_bwd=2 --budget 110 --check --profile $OUT/prof --json $OUT/sweep_gdn_c.json > $OUT/sweep_gdn_c.log 2>&1
echo "== sweep gdn rc=$?"; grep -E "^gdn |Error|gated_delta_rule_|device time" $OUT/sweep_gdn_c.log | cut -c1-160
rm -rf $OUT/prof
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "gdn or deltanet" > $OUT/gpu_tests_c.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|Error" $OUT/gpu_tests_c.log | tail -n 8
timeout 200 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 --json $OUT/gdn_step_c.json > $OUT/gdn_step_c.log 2>&1
echo "== gdn step rc=$?"; grep -E "row:|MFU|Error" $OUT/gdn_step_c.log | tail -n 4 | cut -c1-400
