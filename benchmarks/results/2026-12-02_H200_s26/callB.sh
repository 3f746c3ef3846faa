#!/usr/bin/env bash
# Session 26, call B: call A's GPU tests never ran (tests/test_public_arguments.py built a 2-device
# mesh at import, a collection error on one GPU; fixed): every GPU test again, then kda-1.3b's step
# with the bf16 inverse and the bounded gates (last timed in session 24 before the bf16 inverse).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/s26B}; mkdir -p "$OUT"
timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests > "$OUT/gpu_tests.log" 2>&1
echo "== gpu tests (rc $?)"; grep -E 'passed|failed|FAILED|Error' "$OUT/gpu_tests.log" | tail -n 12
timeout 150 python3 benchmarks/train_step.py --preset kda-1.3b --gate-lower-bound -5 --sp 1 --json "$OUT/kda_1gpu.json" > "$OUT/kda_1gpu.log" 2>&1
echo "== kda-1.3b one GPU (rc $?)"; tail -n 3 "$OUT/kda_1gpu.log"
