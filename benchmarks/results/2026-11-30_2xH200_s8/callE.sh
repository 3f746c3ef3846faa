#!/usr/bin/env bash
# session 8 call E (2xH200): issue 20 sp=2 with ZeRO-1 over the data axes; issue 14 gdn-1.3b with the
# one-split default (one GPU) and sp=2 with the split SP entry points; the delta rule's GPU tests;
# the GDN op under sp=2
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
LHS=--xla_gpu_enable_latency_hiding_scheduler=true
TS=benchmarks/train_step.py
XLA_FLAGS=$LHS timeout 130 python3 $TS --preset tnl-1b --remat none --sp 1 2 --loss-chunks 1 --shard-optimizer-over-data --json "$OUT/zero1.json" > "$OUT/zero1.log" 2>&1
echo "== zero1"; grep -E "row:|Error" "$OUT/zero1.log" | tail -n 3
( CUDA_VISIBLE_DEVICES=0 timeout 140 python3 $TS --preset gdn-1.3b --remat none --json "$OUT/gdn13b.json" > "$OUT/gdn13b.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 140 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gated_delta_rule_pallas.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ) &
wait
echo "== gdn13b"; grep -E "row:|Error" "$OUT/gdn13b.log" | tail -n 3
echo "== gpu tests"; tail -n 4 "$OUT/gpu_tests.log"
timeout 150 python3 $TS --preset gdn-1.3b --remat none --sp 2 --json "$OUT/gdn13b_sp2.json" > "$OUT/gdn13b_sp2.log" 2>&1
echo "== gdn13b sp2"; grep -E "row:|Error" "$OUT/gdn13b_sp2.log" | tail -n 3
timeout 90 python3 benchmarks/delta_rule_sp.py --ops gdn --strategies allgather ring --no-peer --json "$OUT/delta_sp.json" > "$OUT/delta_sp.log" 2>&1
echo "== delta sp"; grep -E "^\{" "$OUT/delta_sp.log"
