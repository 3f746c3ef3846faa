#!/usr/bin/env bash
# session 14, call A (1xH200): session 13's untimed changes. The gated-delta-rule GPU tests (X stored
# in the matmul dtype, forward-only calls keeping no residuals, fuse_output); GDN with 4 forward
# warps and with the output written by the forward state pass, profiled by kernel
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py > $OUT/gpu_tests_a.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|Error" $OUT/gpu_tests_a.log | tail -n 8
timeout 300 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default num_warps=4 fuse_output=True fuse_output=True,num_warps=4 fuse_output=True,block_e=32 fuse_output=True,num_warps_state=8 --budget 200 --check --profile $OUT/prof --json $OUT/sweep_gdn_a.json > $OUT/sweep_gdn_a.log 2>&1
echo "== sweep gdn rc=$?"; grep -E "^gdn |Error|gated_delta_rule_|device time" $OUT/sweep_gdn_a.log | cut -c1-200
rm -rf $OUT/prof
