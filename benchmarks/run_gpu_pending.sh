#!/usr/bin/env bash
# The GPU measurements left open at the end of session 13, in order of value: about 10 minutes on
# 2 or 4 H200s (a call may run 10; the last step also runs on one); each step has its own time limit and keeps its output if a
# later one fails. Run from the repository root; the peer wheels in .whl (../shared/bench/README.md)
# give the jla rows.
#   OUT=runs/pending bash benchmarks/run_gpu_pending.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/pending}
mkdir -p "$OUT"
N=$(nvidia-smi -L | wc -l)
# issue 18: the softmax strategies on every local GPU with the zig-zag ring's ascending-order fix
# (session 11: 0.76x at sp=2; sp=4 measured only before it); TokenRing has not got the fix yet
timeout 230 python3 benchmarks/hybrid.py --sp $N --reps 3 --strategies allgather tokenring zigzag_ring --json "$OUT/hybrid.json" > "$OUT/hybrid.log" 2>&1
echo "== hybrid"; grep -E "^ +[0-9]+ +[a-z_]+ +[0-9]+" "$OUT/hybrid.log"
# issue 13: the delta rule under sp on every local GPU with session 13's kernels (per-row gates on
# the small side of the state products, KDA's stored inverse without Gram blocks; 4 GPUs: 1.16x
# before session 11's defaults), forward+backward now timed with o kept
timeout 200 python3 benchmarks/delta_rule_sp.py --ops gdn kda --strategies allgather ring --no-peer --json "$OUT/delta_sp.json" > "$OUT/delta_sp.log" 2>&1
echo "== delta rule sp"; grep -E "^\{" "$OUT/delta_sp.log"
# issue 14 (resolved on one run): gdn-1.3b sp 1 / 2 again, for the spread of the 0.916
timeout 260 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 2 --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 3
# session 13: GDN's forward chunk kernels with 4 warps (offline ptxas: the whole-chunk wy kernel
# 176 registers, no spills, two programs per SM, against 245 and one at 8 warps) and the output
# written by the forward state pass (BlockConfig.fuse_output); never timed; then its GPU test
timeout 260 python3 benchmarks/delta_rule_sweep.py --ops gdn --labels default num_warps=4 fuse_output=True fuse_output=True,num_warps=4 fuse_output=True,block_e=32 fuse_output=True,num_warps_state=8 --budget 220 --json "$OUT/sweep_gdn_s13.json" > "$OUT/sweep_gdn_s13.log" 2>&1
echo "== gdn forward warps, fused output"; grep -E "^gdn " "$OUT/sweep_gdn_s13.log"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "fused or gdn-block-e-16-docs" > "$OUT/gpu_tests_fused.log" 2>&1
echo "== gpu tests fused"; tail -n 3 "$OUT/gpu_tests_fused.log"
