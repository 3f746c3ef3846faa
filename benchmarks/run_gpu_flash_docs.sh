#!/usr/bin/env bash
# The flash-attention GPU tests and the kernels on causal 32K (H32 Hk8 D128 bf16) with 0 and 16
# packed documents per row (with and without document block skipping), one GPU. Logs under $OUT.
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 150 python3 -m pytest -q -rA -m gpu -p no:cacheprovider -n 3 tests/pallas_kernels/test_flash_attention.py > $OUT/gpu_tests_flash.log 2>&1
grep -E "PASSED|FAILED|passed|failed" $OUT/gpu_tests_flash.log | tail -8
unset XLA_PYTHON_CLIENT_PREALLOCATE
for d in 0 16; do timeout 90 python3 benchmarks/flash_attention.py --q-start 0 --k-tokens 32768 --fwd 128,64,4,3 --bwd 64,64,64,64,4,2 --docs $d --json $OUT/flash_docs$d.json > $OUT/flash_docs$d.log 2>&1; echo "docs=$d"; tail -5 $OUT/flash_docs$d.log; done
timeout 90 python3 benchmarks/flash_attention.py --q-start 0 --k-tokens 32768 --fwd 128,64,4,3 --bwd 64,64,64,64,4,2 --docs 16 --no-skip --json $OUT/flash_docs16_noskip.json > $OUT/flash_docs16_noskip.log 2>&1; echo "docs=16 no-skip"; tail -3 $OUT/flash_docs16_noskip.log
