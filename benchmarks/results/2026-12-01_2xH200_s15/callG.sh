#!/usr/bin/env bash
# session 15, call G (1xH200): after the whole-pair fallback for queries that hold a document
# boundary: the block and layer GPU tests that take documents, then each rank's block compute at
# sp=2 with 8K-token documents (call E: 27.09 ms against Pallas 25.28)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention_cudnn_blocks.py tests/lasp_jax/test_softmax_cudnn_blocks.py -k "recurrence or on_gpus" > $OUT/gpu_tests_cudnn_blocks.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|^FAILED" $OUT/gpu_tests_cudnn_blocks.log | tail -n 20 | cut -c1-300
timeout 100 python3 benchmarks/softmax_rank_work.py --sp 2 --doc-len 8192 --impls cudnn_blocks pallas --reps 3 --json $OUT/rank_work_docs8192.json > $OUT/rank_work_docs8192.log 2>&1
echo "== rank work docs 8192 rc=$?"; grep -v Warning $OUT/rank_work_docs8192.log | cut -c1-250 | tail -n 8
