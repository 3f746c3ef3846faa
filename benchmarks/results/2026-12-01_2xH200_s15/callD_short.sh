#!/usr/bin/env bash
# session 15, the short form of call D for what device time is left (~4 min) if 2 GPUs are lent:
# the softmax layer at sp=2 with impl="auto" (cuDNN block pairs) against one cuDNN GPU
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 benchmarks/hybrid.py --sp 2 --reps 2 --strategies allgather tokenring --json $OUT/hybrid.json > $OUT/hybrid.log 2>&1
echo "== hybrid rc=$?"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+|Error" $OUT/hybrid.log | cut -c1-250
