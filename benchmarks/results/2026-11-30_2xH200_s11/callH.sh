#!/usr/bin/env bash
# session 11, call H (2xH200): GDN under sp=2 at 16 heads (with Φ): runs per shard 2/4/8/16
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather --no-peer --sp-splits 2 4 8 16 --json $OUT/delta_sp2_h.json > $OUT/delta_sp2_h.log 2>&1
echo "== rc=$?"; grep -E "^\{" $OUT/delta_sp2_h.log
