#!/usr/bin/env bash
# session 10 call C (2xH200): issue 14, gdn-1.3b sp=2 alone, profiled (call B's sp 1/2 run was stopped by
# its limit during the sp=2 row; its sp=1 row is the reference); issue 13, the delta rule under sp=2
# and the KDA op with the transition pass without [U | 0]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
TS=benchmarks/train_step.py
timeout 250 python3 $TS --preset gdn-1.3b --remat none --sp 2 --profile /tmp/prof_gdn --json "$OUT/gdn_sp2.json" > "$OUT/gdn_sp2.log" 2>&1
echo "== gdn sp2"; grep -E "row:|Error|exposed|collectives|Pallas|matmuls|fusions" "$OUT/gdn_sp2.log" | tail -n 8
timeout 120 python3 benchmarks/delta_rule_sp.py --ops gdn kda --strategies allgather ring --no-peer --json "$OUT/delta_sp.json" > "$OUT/delta_sp.log" 2>&1
echo "== delta rule sp"; grep -E "^\{" "$OUT/delta_sp.log"
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/delta_rule.py --ops kda --impls project --shapes 1,32768,16,128 --json "$OUT/kda_op.json" > "$OUT/kda_op.log" 2>&1
echo "== kda op"; tail -n 6 "$OUT/kda_op.log"
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json
