#!/usr/bin/env bash
# session 11, call I (2xH200): the split entry points' new default (runs until half the SMs: 2 at
# 16 heads) timed under sp=2; the sharded layer's GPU tests
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 100 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather ring --no-peer --json $OUT/delta_sp2_i.json > $OUT/delta_sp2_i.log 2>&1
echo "== rc=$?"; grep -E "^\{" $OUT/delta_sp2_i.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/lasp_jax/test_lasp_gated_delta_rule.py > $OUT/gpu_tests_i.log 2>&1
echo "== gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests_i.log
