#!/usr/bin/env bash
# session 11, call G (2xH200): the sharded GDN op with 16-wide value blocks in its split entry
# points (with Φ, 16 heads), 2/4/8 runs per shard, against 32-wide (the default)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather --no-peer --sp-splits 2 4 8 --sp-block-e 16 --json $OUT/delta_sp2_g16.json > $OUT/delta_sp2_g16.log 2>&1
echo "== 16 rc=$?"; grep -E "^\{" $OUT/delta_sp2_g16.log
timeout 60 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather --no-peer --json $OUT/delta_sp2_g32.json > $OUT/delta_sp2_g32.log 2>&1
echo "== 32 rc=$?"; grep -E "^\{" $OUT/delta_sp2_g32.log
