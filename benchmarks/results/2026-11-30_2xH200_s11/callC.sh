#!/usr/bin/env bash
# session 11, call C (4xH200, lent this time): the delta rule under sp=4 beside jax-linear-attention;
# the softmax strategies at sp 2 and 4 (zig-zag ring with a904c66 reverted); GDN state-pass value
# blocks at 16 heads
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L | wc -l
timeout 210 python3 benchmarks/delta_rule_sp.py --ops gdn kda --strategies allgather ring --json $OUT/delta_sp4.json > $OUT/delta_sp4.log 2>&1
echo "== delta sp4 rc=$?"; grep -E "^\{" $OUT/delta_sp4.log
timeout 230 python3 benchmarks/hybrid.py --sp 2 4 --reps 3 --strategies allgather tokenring zigzag_ring ring --json $OUT/hybrid_sp24.json > $OUT/hybrid_sp24.log 2>&1
echo "== hybrid rc=$?"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+" $OUT/hybrid_sp24.log
timeout 80 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default block_e=16 block_e=16,num_warps_state=2 --json $OUT/sweep16.json > $OUT/sweep16.log 2>&1
echo "== sweep16 rc=$?"; grep -E "^gdn" $OUT/sweep16.log
