#!/usr/bin/env bash
# session 12, call A (1xH200): per-channel diagonal tiles by levels of masked products
# (common._channel_diag_levels) and whole-chunk KDA tiles (BlockConfig.channel_rows): the KDA
# sweep of the new variants, the compiled kernels' GPU tests, and the session-11 common.py (the
# [16, 16, D] pair tensors) as the same-run baseline
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 330 python3 benchmarks/delta_rule_sweep.py --ops kda --only 10 --budget 280 --check --json $OUT/sweep_kda.json > $OUT/sweep_kda.log 2>&1
echo "== sweep rc=$?"; grep -E "^kda |^\{" $OUT/sweep_kda.log | cut -c1-400
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k kda > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; tail -n 5 $OUT/gpu_tests.log
cp pallas_kernels/gated_delta_rule/common.py /tmp/new_common.py
# old_common_s11.py: `git show b40aa9b:pallas_kernels/gated_delta_rule/common.py`, written into the
# tree before the call (not committed)
cp old_common_s11.py pallas_kernels/gated_delta_rule/common.py
timeout 90 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default --json $OUT/sweep_kda_old.json > $OUT/sweep_kda_old.log 2>&1
echo "== old rc=$?"; grep -E "^kda " $OUT/sweep_kda_old.log
cp /tmp/new_common.py pallas_kernels/gated_delta_rule/common.py
