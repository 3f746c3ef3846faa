#!/usr/bin/env bash
# session 23, call C (1xH200): kda-1.3b's training step with the model's bounded gates (>= -5 per
# token: the 16-row branch of the new three-way switch) after the default change; the scalar linear
# attention's float32 default at head dim 256 (session 21's GPU test, pending since)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 240 python3 benchmarks/train_step.py --preset kda-1.3b --iters 6 --gate-lower-bound -5 --json $OUT/kda13b_bound5.json > $OUT/kda13b_bound5.log 2>&1
echo "== kda-1.3b bound -5 rc=$?"; grep -E "row:|Error|ms" $OUT/kda13b_bound5.log | tail -n 4 | cut -c1-250
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_pallas_triton.py -k "float32_wide" -rA > $OUT/gpu_tests_f32_wide.log 2>&1
echo "== gpu test float32 wide heads rc=$?"; tail -n 3 $OUT/gpu_tests_f32_wide.log | cut -c1-200
