#!/usr/bin/env bash
# session 10 call B (2xH200): issue 14, gdn-1.3b sp 1/2 profiled (exposed collectives, the transition
# pass without [U | 0]), then sp=2 with XLA's analytical latency estimator and with two collectives in flight
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
TS=benchmarks/train_step.py
timeout 220 python3 $TS --preset gdn-1.3b --remat none --sp 1 2 --profile /tmp/prof_gdn --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp"; grep -E "row:|Error|exposed" "$OUT/gdn_sp.log" | tail -n 6
LHS=--xla_gpu_enable_latency_hiding_scheduler=true
XLA_FLAGS="$LHS --xla_gpu_enable_analytical_latency_estimator=true" timeout 130 python3 $TS --preset gdn-1.3b --remat none --sp 2 --iters 6 --json "$OUT/gdn_sp2_analytical.json" > "$OUT/gdn_sp2_analytical.log" 2>&1
echo "== gdn sp2 analytical estimator"; grep -E "row:|Error" "$OUT/gdn_sp2_analytical.log" | tail -n 2
XLA_FLAGS="$LHS --xla_gpu_experimental_parallel_collective_overlap_limit=2" timeout 130 python3 $TS --preset gdn-1.3b --remat none --sp 2 --iters 6 --json "$OUT/gdn_sp2_overlap2.json" > "$OUT/gdn_sp2_overlap2.log" 2>&1
echo "== gdn sp2 two collectives in flight"; grep -E "row:|Error" "$OUT/gdn_sp2_overlap2.log" | tail -n 2
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json
