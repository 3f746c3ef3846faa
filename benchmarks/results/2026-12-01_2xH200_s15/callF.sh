#!/usr/bin/env bash
# session 15, call F (1xH200): the cuDNN block-pair GPU tests after call E's test fix (rows that see
# no key compared by their finiteness) and the auto choice with documents
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention_cudnn_blocks.py tests/lasp_jax/test_softmax_cudnn_blocks.py > $OUT/gpu_tests_cudnn_blocks.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|Error |error:|^FAILED" $OUT/gpu_tests_cudnn_blocks.log | tail -n 30 | cut -c1-300
