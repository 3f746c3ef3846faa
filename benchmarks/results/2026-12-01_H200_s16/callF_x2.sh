#!/usr/bin/env bash
# session 16, for two GPUs if lent: the softmax layer at sp=2 with impl="auto" (cuDNN block pairs)
# against one cuDNN GPU, and GDN under sp with the new split default against one GPU
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
mkdir -p $OUT
nvidia-smi -L
timeout 150 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather ring --no-peer --json $OUT/delta_sp.json > $OUT/delta_sp.log 2>&1
echo "== delta sp rc=$?"; grep -E '"what"' $OUT/delta_sp.log | cut -c1-200
timeout 180 python3 benchmarks/hybrid.py --sp 2 --reps 2 --strategies allgather tokenring --json $OUT/hybrid.json > $OUT/hybrid.log 2>&1
echo "== hybrid rc=$?"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+|Error" $OUT/hybrid.log | cut -c1-250
