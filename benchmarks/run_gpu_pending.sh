#!/usr/bin/env bash
# The GPU measurements left open at the end of session 10, in order of value, on 2xH200: about 9
# minutes (a call may run 10); each step has its own time limit and keeps its output if a later one fails.
# Run from the repository root; the peer wheels in .whl (see ../shared/bench/README.md) give the jla rows.
#   OUT=runs/pending bash benchmarks/run_gpu_pending.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/pending}
mkdir -p "$OUT"
TS=benchmarks/train_step.py  # runs with lasp-train's default XLA flags (the latency-hiding scheduler)
# issue 14: gdn-1.3b sp=2 per-GPU throughput with the no-transition path on two ranks (session 10,
# GPU-tested, untimed; 0.895 before it in one run, target 0.90): both rows in one run, ~200 s
timeout 260 python3 $TS --preset gdn-1.3b --remat none --sp 1 2 --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 3
# the op alone at 32 heads, ring and allgather (1.32x of one GPU with the transition, session 10)
timeout 120 python3 benchmarks/delta_rule_sp.py --ops gdn --heads 32 --strategies allgather ring --no-peer --json "$OUT/delta_sp32.json" > "$OUT/delta_sp32.log" 2>&1
echo "== delta rule sp, 32 heads"; grep -E "^\{" "$OUT/delta_sp32.log"
# issue 14: the same step profiled (what of the +76 ms is left, by kernel)
timeout 180 python3 $TS --preset gdn-1.3b --remat none --sp 2 --profile /tmp/prof_gdn --json "$OUT/gdn_sp2_prof.json" > "$OUT/gdn_sp2_prof.log" 2>&1
echo "== gdn sp2 profiled"; grep -E "row:|Error|exposed|leaving|transition|state_bwd_local" "$OUT/gdn_sp2_prof.log" | tail -n 6
