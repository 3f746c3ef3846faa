#!/usr/bin/env bash
# The GPU measurements left open at the end of session 14, in order of value: about 15 minutes on
# 2 or 4 H200s (a call may run 10; the first two and the last steps also run on one); each step has its own time limit and keeps its output if a
# later one fails. Run from the repository root; the peer wheels in .whl (../shared/bench/README.md)
# give the jla rows.
#   OUT=runs/pending bash benchmarks/run_gpu_pending.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/pending}
mkdir -p "$OUT"
N=$(nvidia-smi -L | wc -l)
# issue 13, one GPU: KDA's forward off-diagonal blocks by whole-chunk products (BlockConfig.stacked_pairs,
# session 14, never compiled for a GPU: its GPU test first), timed against the default
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "stacked" > "$OUT/gpu_tests_stacked.log" 2>&1
echo "== gpu tests stacked"; tail -n 2 "$OUT/gpu_tests_stacked.log"
timeout 230 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default stacked_pairs=True stacked_pairs=True,num_warps_bwd=8 stacked_pairs=True,block_cols=64 --budget 170 --check --profile "$OUT/prof" --json "$OUT/sweep_kda_stacked.json" > "$OUT/sweep_kda_stacked.log" 2>&1
echo "== kda stacked"; grep -E "^kda |gated_delta_rule_(wy|output) " "$OUT/sweep_kda_stacked.log"
# the same for the per-channel linear attention (GLA): its GPU test, then timed against the default
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py -k "stacked" > "$OUT/gpu_tests_gla_stacked.log" 2>&1
echo "== gla gpu tests stacked"; tail -n 2 "$OUT/gpu_tests_gla_stacked.log"
timeout 200 python3 benchmarks/gla_sweep.py --labels default stacked_pairs stacked_pairs,grads_warps=4 stacked_pairs,recompute_dz --budget 170 --check --json "$OUT/gla_stacked.json" > "$OUT/gla_stacked.log" 2>&1
echo "== gla stacked"; grep -E "^(default|stacked)" "$OUT/gla_stacked.log"
# issue 18: the softmax strategies on every local GPU with the zig-zag ring's ascending-order fix
# (session 11: 0.76x at sp=2; sp=4 measured only before it); TokenRing has not got the fix (at
# P = 2 it would not change which parts carry the work; from P = 4 it would)
timeout 230 python3 benchmarks/hybrid.py --sp $N --reps 3 --strategies allgather tokenring zigzag_ring --json "$OUT/hybrid.json" > "$OUT/hybrid.log" 2>&1
echo "== hybrid"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+" "$OUT/hybrid.log"
# issue 13: the delta rule under sp on every local GPU with sessions 13-14's kernels and launch
# parameters (4 GPUs: 1.16x before session 11's defaults), forward+backward timed with o kept
timeout 200 python3 benchmarks/delta_rule_sp.py --ops gdn kda --strategies allgather ring --no-peer --json "$OUT/delta_sp.json" > "$OUT/delta_sp.log" 2>&1
echo "== delta rule sp"; grep -E "^\{" "$OUT/delta_sp.log"
# gdn-1.3b sp 1 / 2 with session 14's defaults (42.4% MFU on one GPU, one run; sp=2 0.916 in session 11)
timeout 260 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 2 --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 3
