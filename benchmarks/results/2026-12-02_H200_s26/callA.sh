#!/usr/bin/env bash
# Session 26, call A: every GPU test on one H200 after session 25's changes (scale checks in every op,
# layer input checks, the lasp vjp's state cast, typed identities in the KDA XLA path), then
# gdn-1.3b's training step with session 24's bf16 inverse (last timed in session 15).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/s26A}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())"
timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests > "$OUT/gpu_tests.log" 2>&1
echo "== gpu tests (rc $?)"; grep -E 'passed|failed|FAILED|Error' "$OUT/gpu_tests.log" | tail -n 12
timeout 170 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 --json "$OUT/gdn_1gpu.json" > "$OUT/gdn_1gpu.log" 2>&1
echo "== gdn-1.3b one GPU (rc $?)"; tail -n 3 "$OUT/gdn_1gpu.log"
