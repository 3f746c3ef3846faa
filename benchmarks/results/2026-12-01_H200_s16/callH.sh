#!/usr/bin/env bash
# session 16, call H (1xH200): the flash kernels' GPU tests after the document bounds moved to an
# unrolled binary search (calls B-G timed it, none checked it on the GPU), and the cudnn_blocks
# block tests with documents (their fallback runs those kernels)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention.py > $OUT/gpu_tests_flash.log 2>&1
echo "== flash gpu tests rc=$?"; grep -E "passed|failed|^FAILED" $OUT/gpu_tests_flash.log | tail -n 10 | cut -c1-300
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention_cudnn_blocks.py -k "documents" > $OUT/gpu_tests_cudnn_blocks_docs.log 2>&1
echo "== cudnn_blocks document gpu tests rc=$?"; grep -E "passed|failed|^FAILED" $OUT/gpu_tests_cudnn_blocks_docs.log | tail -n 10 | cut -c1-300
