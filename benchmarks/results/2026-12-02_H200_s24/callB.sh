#!/usr/bin/env bash
# session 24, call B (1xH200): the op told the gates' floor (gate_lower_bound): GPU tests, then the
# kda-1.3b step (its layers pass -5) with this tree and with HEAD before the change (runs/old_head,
# carried), same run; then GLA's 32-row output row again beside its default
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 170 env PYTHONPATH=$PWD python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "gate_lower_bound" -rA > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log | cut -c1-200 | tail -n 6
timeout 170 env PYTHONPATH=$PWD python3 benchmarks/train_step.py --preset kda-1.3b --gate-lower-bound -5 --sp 1 --json $OUT/kda_told.json > $OUT/kda_told.log 2>&1
echo "== kda-1.3b, op told the bound rc=$?"; tail -n 3 $OUT/kda_told.log | cut -c1-250
(cd runs/old_head && timeout 170 env PYTHONPATH=$PWD python3 benchmarks/train_step.py --preset kda-1.3b --gate-lower-bound -5 --sp 1 --json $OUT/kda_before.json > $OUT/kda_before.log 2>&1)
echo "== kda-1.3b, before rc=$?"; tail -n 3 $OUT/kda_before.log | cut -c1-250
timeout 100 env PYTHONPATH=$PWD python3 benchmarks/gla_sweep.py --reps 30 --budget 80 --labels default output_rows=32 --json "$OUT/gla_32_rows.json" > "$OUT/gla_32_rows.log" 2>&1
echo "== gla 32-row output rc=$?"; grep -E '^\{' "$OUT/gla_32_rows.log" | cut -c1-120
