#!/usr/bin/env bash
# session 15, call D (2xH200): issue 18's layer targets with impl="auto" now picking cuDNN block
# pairs under a mesh (cudnn_blocks): every softmax strategy at sp=2 (32K tokens per GPU, H32 Hk8
# D128 bf16, fwd+bwd) against one cuDNN GPU on the whole sequence; then the TNL hybrid group's
# train step at sp=2; then gdn-1.3b sp 1 / 2 with sessions 12-14's GDN kernels
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 260 python3 benchmarks/hybrid.py --sp 2 --reps 3 --strategies allgather zigzag_ring tokenring ring --json $OUT/hybrid.json > $OUT/hybrid.log 2>&1
echo "== hybrid rc=$?"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+|Error" $OUT/hybrid.log | cut -c1-250
timeout 150 python3 benchmarks/hybrid.py --workload tnl-hybrid --sp 2 --reps 3 --strategies allgather --json $OUT/tnl_hybrid.json > $OUT/tnl_hybrid.log 2>&1
echo "== tnl-hybrid rc=$?"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+|Error" $OUT/tnl_hybrid.log | cut -c1-250
timeout 170 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 2 --json $OUT/gdn_sp2.json > $OUT/gdn_sp2.log 2>&1
echo "== gdn sp2 rc=$?"; grep -E "row:|Error" $OUT/gdn_sp2.log | tail -n 3 | cut -c1-300
