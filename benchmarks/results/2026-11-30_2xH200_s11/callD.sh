#!/usr/bin/env bash
# session 11, call D (2xH200): the 16-wide value-block default (GDN where 32-wide blocks fill at
# most half the SMs): GPU tests of the kernels, the op against 32-wide blocks and beside
# jax-linear-attention, the op under sp=2
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; tail -n 3 $OUT/gpu_tests.log
timeout 80 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default block_e=32 --json $OUT/sweep16b.json > $OUT/sweep16b.log 2>&1
echo "== sweep rc=$?"; grep -E "^gdn \|" $OUT/sweep16b.log
timeout 100 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather ring --no-peer --json $OUT/delta_sp2.json > $OUT/delta_sp2.log 2>&1
echo "== delta sp2 rc=$?"; grep -E "^\{" $OUT/delta_sp2.log
timeout 110 python3 benchmarks/delta_rule.py --ops gdn --impls project jla --shapes 1,32768,16,128 4,8192,16,128 --timeout 50 --json $OUT/delta_op.json > $OUT/delta_op.log 2>&1
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op.log | tail -n 8
