#!/usr/bin/env bash
# session 11, call E (2xH200): the delta rule under sp=2 with the split entry points back on
# 32-wide value blocks (the one-GPU row on the new 16-wide default)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 100 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather ring --no-peer --json $OUT/delta_sp2_e.json > $OUT/delta_sp2_e.log 2>&1
echo "== delta sp2 rc=$?"; grep -E "^\{" $OUT/delta_sp2_e.log
