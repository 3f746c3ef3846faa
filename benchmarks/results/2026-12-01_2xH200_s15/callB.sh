#!/usr/bin/env bash
# session 15, call B (1xH200; the 2-GPU kind was no longer lent): issue 18 with cuDNN's fused
# kernels as every softmax strategy's block pairs (impl="cudnn_blocks", new). Its GPU tests (cuDNN's
# calls against the jnp twin, the block functions against the jnp recurrence, the layer on the one
# GPU against the float64 oracle); then each rank's block work of the balanced allgather layer at
# sp = 2 and 4 (32K tokens per GPU, H32 Hk8 D128 bf16) on this GPU against one cuDNN GPU on the
# whole sequence; then the gdn-1.3b training step on one GPU with session 14's final GDN defaults
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention_cudnn_blocks.py tests/lasp_jax/test_softmax_cudnn_blocks.py > $OUT/gpu_tests_cudnn_blocks.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|Error|error" $OUT/gpu_tests_cudnn_blocks.log | tail -n 14 | cut -c1-300
timeout 200 python3 benchmarks/softmax_rank_work.py --sp 2 4 --json $OUT/rank_work.json > $OUT/rank_work.log 2>&1
echo "== rank work rc=$?"; cat $OUT/rank_work.log | grep -v Warning | cut -c1-250 | tail -n 20
timeout 170 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 --json $OUT/gdn_1gpu.json > $OUT/gdn_1gpu.log 2>&1
echo "== gdn-1.3b rc=$?"; grep -E "row:|Error|MFU|ms" $OUT/gdn_1gpu.log | tail -n 4 | cut -c1-300
