#!/usr/bin/env bash
# Issue 18 item 3 on one H200 (about 5 minutes): the compiled flash-attention GPU tests that cover this
# session's kernel changes (grouped heads at traced offsets, packed documents with and without block
# skipping), then benchmarks/flash_sweep.py (causal 32K, H32 Hk8 D128 bf16: BlockConfigs beside cuDNN).
# Logs and JSON under $OUT; the sweep rewrites its JSON after every row, so a cut-short run keeps its rows.
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/env.txt 2>&1
timeout 100 python3 -m pytest -q -rA -m gpu -p no:cacheprovider -k "allgather or documents" \
  tests/pallas_kernels/test_flash_attention.py > $OUT/gpu_tests_flash.log 2>&1
grep -E "PASSED|FAILED|passed|failed|error" $OUT/gpu_tests_flash.log | tail -6
timeout 200 python3 benchmarks/flash_sweep.py --budget 150 --out $OUT/flash_sweep.json > $OUT/flash_sweep.log 2>&1
tail -30 $OUT/flash_sweep.log
