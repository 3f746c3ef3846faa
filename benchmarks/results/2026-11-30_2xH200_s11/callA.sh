#!/usr/bin/env bash
# session 11, call A (2xH200): issue 14's untimed no-transition path; the state passes' value
# blocks; a device-time profile of the softmax layers under sp (issue 18)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT
nvidia-smi -L; python3 -c "import jax, triton; print(jax.__version__, triton.__version__)"
timeout 245 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 2 --json $OUT/gdn_sp.json > $OUT/gdn_sp.log 2>&1
echo "== gdn sp rc=$?"; grep -E "row:|Error|MFU" $OUT/gdn_sp.log | tail -n 4
timeout 110 python3 benchmarks/delta_rule_sweep.py --ops gdn --shape 1,32768,32,128 --budget 90 --labels default block_e=16 block_e=16,num_warps_state=2 num_warps_state=8 num_stages_state=2 --json $OUT/sweep32.json > $OUT/sweep32.log 2>&1
echo "== sweep rc=$?"; grep -E "^gdn|Error" $OUT/sweep32.log
timeout 190 python3 benchmarks/hybrid.py --sp 2 --reps 3 --strategies allgather tokenring zigzag_ring --profile /tmp/hprof --json $OUT/hybrid_prof.json > $OUT/hybrid_prof.log 2>&1
echo "== hybrid rc=$?"; grep -E "sp=|single" $OUT/hybrid_prof.log | head -20
