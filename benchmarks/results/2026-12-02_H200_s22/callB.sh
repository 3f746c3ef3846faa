#!/usr/bin/env bash
# session 22, call B (1xH200): KDA with (1) the pregated operands as broadcasts in the time-major
# layout (call A's HLO: XLA transposed the whole float32 gates to pick each chunk's last row by a
# masked sum, twice) and (2) the chunk-local reverse sums of the gates' gradient as a Pallas kernel
# (exact 16-row tile products plus later tiles' totals; was XLA's reverse cumsum, 0.41 ms); device
# time by kernel; GPU tests of KDA and GLA cases that run them; GLA's default timed
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 150 --profile /tmp/prof --labels default --json $OUT/kda_profile.json > $OUT/kda_profile.log 2>&1
echo "== kda profile rc=$?"; grep -vE "^\{" $OUT/kda_profile.log | grep -E "device time|fusion|Pallas|pallas|kda \|" | cut -c1-160 | head -30
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py tests/pallas_kernels/test_gla_pallas.py -k "kda-docs or cumsum or kda-pregated or float32-128-kda or pregated" -rA > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log | cut -c1-200 | tail -n 14
timeout 120 python3 benchmarks/gla_sweep.py --reps 8 --budget 90 --labels default --json $OUT/gla.json > $OUT/gla.log 2>&1
echo "== gla rc=$?"; tail -n 3 $OUT/gla.log | cut -c1-200
