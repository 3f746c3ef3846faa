#!/usr/bin/env bash
# session 15, call E (1xH200): cuDNN block pairs with packed documents (new) and the review fixes.
# Their GPU tests (cuDNN's calls with per-row query and key lengths against the jnp twin; the block
# functions with and without documents against the jnp recurrence; the layer on this GPU against
# the float64 oracle), then each rank's block compute at sp=2 with documents of 8K tokens and with
# one document of the whole sequence, Pallas beside it
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention_cudnn_blocks.py tests/lasp_jax/test_softmax_cudnn_blocks.py > $OUT/gpu_tests_cudnn_blocks.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|Error |error:|^FAILED" $OUT/gpu_tests_cudnn_blocks.log | tail -n 30 | cut -c1-300
for n in 8192 65536; do
  timeout 150 python3 benchmarks/softmax_rank_work.py --sp 2 --doc-len $n --impls cudnn_blocks pallas --json $OUT/rank_work_docs$n.json > $OUT/rank_work_docs$n.log 2>&1
  echo "== rank work docs $n rc=$?"; grep -v Warning $OUT/rank_work_docs$n.log | cut -c1-250 | tail -n 8
done
