#!/usr/bin/env bash
# The GPU measurements left open at the end of session 8, in order of value, for one 2xH200 call
# (about 10 minutes; each step has its own time limit and keeps its output if a later one fails).
# Run from the repository root; the peer wheels in .whl (see ../shared/bench/README.md) give the jla rows.
#   OUT=runs/pending bash benchmarks/run_gpu_pending.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/pending}
mkdir -p "$OUT"
TS=benchmarks/train_step.py  # runs with lasp-train's default XLA flags (the latency-hiding scheduler)
# issue 20 item 6: the linear-llama3 1B-class row at 32K tokens (never measured), one GPU and sp=2
timeout 150 python3 $TS --preset linear-llama3-1b --remat none --sp 1 2 --json "$OUT/llama.json" > "$OUT/llama.log" 2>&1
# issue 14: gdn-1.3b sp=2 per-GPU throughput (0.854 in session 8 without the scheduler; target 0.90),
# profiled, both rows in one run (notes/sp_overhead.md, gdn-1.3b section)
timeout 200 python3 $TS --preset gdn-1.3b --remat none --sp 1 2 --profile /tmp/prof_gdn --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
# issue 14: kda-1.3b sp=2 (never measured: past 250 s in session 7) and gdn-1.3b with split projections
( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 $TS --preset gdn-1.3b --remat none --split-projections --json "$OUT/gdn_split.json" > "$OUT/gdn_split.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/delta_rule_sp.py --ops kda --strategies allgather --no-peer --json "$OUT/kda_sp_op.json" > "$OUT/kda_sp_op.log" 2>&1 ) &
wait
timeout 300 python3 $TS --preset kda-1.3b --remat none --sp 2 --json "$OUT/kda_sp2.json" > "$OUT/kda_sp2.log" 2>&1
for f in llama gdn_sp gdn_split kda_sp2; do echo "== $f"; grep -E "row:|Error" "$OUT/$f.log" | tail -n 4; done
echo "== kda op sp"; grep -E "^\{" "$OUT/kda_sp_op.log"
