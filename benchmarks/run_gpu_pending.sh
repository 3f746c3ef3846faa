#!/usr/bin/env bash
# The GPU measurements left open at the end of session 7, in order of value, for one 2xH200 call
# (about 9 minutes; each step has its own time limit and keeps its output if a later one fails).
# Run from a copy of the repository root with the peer wheels in ../../.whl only if the jla rows are wanted.
#   OUT=runs/pending bash benchmarks/run_gpu_pending.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/pending}
mkdir -p "$OUT"
LHS=--xla_gpu_enable_latency_hiding_scheduler=true
# issue 20: sp=2 per-GPU throughput (target 0.95) — baseline rows, then the latency-hiding scheduler
# (the one-device all-reduces are already gone from main: notes/sp_overhead.md)
timeout 120 python3 benchmarks/train_step.py --preset tnl-1b --remat none --split-projections --sp 1 2 --json "$OUT/sp_base.json" > "$OUT/sp_base.log" 2>&1
XLA_FLAGS=$LHS timeout 100 python3 benchmarks/train_step.py --preset tnl-1b --remat none --split-projections --sp 2 --json "$OUT/sp2_lhs.json" > "$OUT/sp2_lhs.log" 2>&1
XLA_FLAGS=$LHS timeout 120 python3 benchmarks/train_step.py --preset tnl-1b --remat none --split-projections --sp 1 2 --loss-chunks 1 --json "$OUT/sp_lhs_chunks1.json" > "$OUT/sp_lhs_chunks1.log" 2>&1
# issue 14: the delta-rule models with this session's kernels (KDA stored scores, GDN tf32 WY), one lane per GPU
( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/train_step.py --preset kda-1.3b --remat none --json "$OUT/kda13b.json" > "$OUT/kda13b.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/delta_rule_sweep.py --ops gdn --budget 110 --labels default store_scores=True --json "$OUT/gdn_scores.json" > "$OUT/gdn_scores.log" 2>&1 ) &
wait
for f in sp_base sp2_lhs sp_lhs_chunks1 kda13b; do echo "== $f"; grep -E "row:|Error" "$OUT/$f.log" | tail -n 4; done
echo "== gdn store_scores"; grep -E "^gdn" "$OUT/gdn_scores.log"
