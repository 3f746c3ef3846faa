#!/usr/bin/env bash
# session 11, call K (2xH200): the zig-zag ring with its dealt parts in ascending chunk order
# (the same program slot holds the same work on every rank)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 benchmarks/hybrid.py --sp 2 --reps 3 --strategies zigzag_ring allgather --json $OUT/zz_k.json > $OUT/zz_k.log 2>&1
echo "== rc=$?"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+" $OUT/zz_k.log
