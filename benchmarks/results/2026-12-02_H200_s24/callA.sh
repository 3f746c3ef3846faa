#!/usr/bin/env bash
# session 24, call A (1xH200): the dispatch refactor of session 23 (gate_case / by_gates moved to
# products.py, shared with GLA) on the GPU: the KDA gate-case tests and every GLA GPU case (with the
# 32-row output case); then the two pending sweeps of run_gpu_pending.sh's one-GPU part
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "each_gate_case or 32-row" -rA > $OUT/gpu_tests_kda.log 2>&1
echo "== gpu tests kda rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests_kda.log | cut -c1-200 | tail -n 8
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py -rA > $OUT/gpu_tests_gla.log 2>&1
echo "== gpu tests gla rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests_gla.log | cut -c1-200 | tail -n 8
timeout 150 python3 benchmarks/gla_sweep.py --reps 16 --budget 120 --labels default output_rows=32 --json "$OUT/gla_32_rows.json" > "$OUT/gla_32_rows.log" 2>&1
echo "== gla 32-row output rc=$?"; grep -E '^\{' "$OUT/gla_32_rows.log" | cut -c1-240
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 16 --budget 170 --labels default channel_rows=32,inverse_precision=tf32 --json "$OUT/kda_rows32_tf32.json" > "$OUT/kda_rows32_tf32.log" 2>&1
echo "== kda 32-row tiles everywhere, tf32 inverse rc=$?"; grep -E '^\{' "$OUT/kda_rows32_tf32.log" | cut -c1-240
