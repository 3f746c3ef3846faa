#!/usr/bin/env bash
# session 11, call F (2xH200): the sharded delta rule keeps its in-GPU runs where one run fills at
# most half the SMs (16 heads); its GPU tests; the op under sp=2 against one GPU (16-wide default)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 100 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather ring --no-peer --json $OUT/delta_sp2_f.json > $OUT/delta_sp2_f.log 2>&1
echo "== delta sp2 rc=$?"; grep -E "^\{" $OUT/delta_sp2_f.log
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/lasp_jax/test_lasp_gated_delta_rule.py > $OUT/gpu_tests_f.log 2>&1
echo "== gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests_f.log
