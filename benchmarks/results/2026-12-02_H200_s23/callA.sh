#!/usr/bin/env bash
# session 23, call A (1xH200): the kernel-side changes session 22 made after its device time ran
# out: KDA's 32-row output / WY-backward tiles (GPU test, then the sweep rows with device time by
# kernel), GLA's gate check on the cumulative-sum kernel's sums (its GPU cases)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "32-row" > $OUT/gpu_tests_kda_32_rows.log 2>&1
echo "== gpu test kda 32-row tiles rc=$?"; tail -n 3 $OUT/gpu_tests_kda_32_rows.log
timeout 300 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 230 --profile /tmp/prof --labels default output_rows=32,wy_bwd_rows=32 wy_bwd_rows=32 output_rows=32 --json $OUT/kda_32_rows.json > $OUT/kda_32_rows.log 2>&1
echo "== kda 32-row tiles rc=$?"; grep -vE "^\{" $OUT/kda_32_rows.log | grep -E "device time|gated_delta_rule_(wy|output|state)|kda \|" | cut -c1-120 | head -40
timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py -k "pregated or bfloat16-256 or match_reference and default" > $OUT/gpu_tests_gla.log 2>&1
echo "== gpu tests gla rc=$?"; tail -n 3 $OUT/gpu_tests_gla.log
