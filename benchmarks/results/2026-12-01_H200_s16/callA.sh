#!/usr/bin/env bash
# session 16, call A (1xH200): the cudnn_blocks GPU tests after session 15's four CPU-only edits; a
# device profile of rank 0's block compute at sp=2 with 8K-token documents (cudnn_blocks 10% slower
# than Pallas in session 15, unexplained) and without documents
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention_cudnn_blocks.py tests/lasp_jax/test_softmax_cudnn_blocks.py > $OUT/gpu_tests_cudnn_blocks.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|^FAILED" $OUT/gpu_tests_cudnn_blocks.log | tail -n 20 | cut -c1-300
timeout 150 python3 benchmarks/softmax_rank_work.py --sp 2 --doc-len 8192 --impls cudnn_blocks pallas --reps 3 --profile /tmp/prof_docs --json $OUT/rank_work_docs8192.json > $OUT/rank_work_docs8192.log 2>&1
echo "== rank work docs 8192 rc=$?"; grep -v Warning $OUT/rank_work_docs8192.log | cut -c1-200 | tail -n 80
