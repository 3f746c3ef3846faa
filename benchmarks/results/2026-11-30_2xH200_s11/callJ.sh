#!/usr/bin/env bash
# session 11, call J (2xH200): after the review mends (the M-only pass where the shard default is one run): sp=2 GDN at 16 and 32 heads, the sharded layer GPU tests

set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 100 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather ring --no-peer --json $OUT/delta_sp2_j.json > $OUT/delta_sp2_j.log 2>&1
echo "== rc=$?"; grep -E "^\{" $OUT/delta_sp2_j.log
timeout 60 python3 benchmarks/delta_rule_sp.py --ops gdn --heads 32 --strategies allgather --no-peer --json $OUT/delta_sp2_j32.json > $OUT/delta_sp2_j32.log 2>&1; grep -E "^\{" $OUT/delta_sp2_j32.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/lasp_jax/test_lasp_gated_delta_rule.py > $OUT/gpu_tests_j.log 2>&1
echo "== gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests_j.log
