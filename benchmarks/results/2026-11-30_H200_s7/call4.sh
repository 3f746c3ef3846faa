#!/usr/bin/env bash
# session 7 call 4 (one H200): GLA GPU tests with the split-gradient default; TNL-1B at 1M tokens
cd "$(dirname "$0")"
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 110 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gla_pallas.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "== gpu tests"; tail -n 4 "$OUT/gpu_tests.log"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 320 python3 benchmarks/train_step.py --preset tnl-1b --tokens-per-device 1048576 --remat full --mlp-chunk 65536 --split-projections --warmup 1 --iters 1 --json "$OUT/m1_full.json" > "$OUT/m1.log" 2>&1
echo "rc $?"; echo "== 1M"; grep -E "row:|Error|error" "$OUT/m1.log" | cut -c1-600 | tail -n 5
