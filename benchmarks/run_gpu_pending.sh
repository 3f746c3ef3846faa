#!/usr/bin/env bash
# The GPU measurements left open at the end of session 9, in order of value, on 2xH200: about 17
# minutes, so two calls (a call may run 10); each step has its own time limit and keeps its output
# if a later one fails.
# Run from the repository root; the peer wheels in .whl (see ../shared/bench/README.md) give the jla rows.
#   OUT=runs/pending bash benchmarks/run_gpu_pending.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/pending}
mkdir -p "$OUT"
TS=benchmarks/train_step.py  # runs with lasp-train's default XLA flags (the latency-hiding scheduler)
# issue 20 item 5 as its text asks: the longest-sequence search itself reaching 1,048,576 tokens
# (session 7 ran the 1M step directly, 16.1 s, 72.8 GB; the search was never run on a GPU), one GPU
CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 240 python3 $TS --preset tnl-1b --scan-layers --search-longest --search-remat offload --mlp-chunk 65536 --tokens-per-device 1048576 --max-tokens 1048576 --json "$OUT/longest.json" > "$OUT/longest.log" 2>&1
echo "== longest"; grep -E "tokens/device|Error" "$OUT/longest.log" | tail -n 3
# the transition pass without [U | 0] (session 9, untested on a GPU): the delta rule's compiled
# kernels, single-device and sharded over two GPUs (its document now crosses the shard edge), and
# the linear-attention kernels (the two-stage default above head dim 64)
timeout 300 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gated_delta_rule_pallas.py tests/lasp_jax/test_lasp_gated_delta_rule.py tests/pallas_kernels/test_pallas_triton.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "== gpu tests"; tail -n 3 "$OUT/gpu_tests.log"
# issue 14: gdn-1.3b sp=2 per-GPU throughput (0.872 in session 9 before the transition change;
# target 0.90), both rows in one run, profiled
timeout 220 python3 $TS --preset gdn-1.3b --remat none --sp 1 2 --profile /tmp/prof_gdn --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 3
# issue 13: the delta rule under sp=2 and the KDA op alone (KDA's 8 in-GPU splits run the transition)
timeout 120 python3 benchmarks/delta_rule_sp.py --ops gdn kda --strategies allgather ring --no-peer --json "$OUT/delta_sp.json" > "$OUT/delta_sp.log" 2>&1
echo "== delta rule sp"; grep -E "^\{" "$OUT/delta_sp.log"
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/delta_rule.py --ops kda --impls project --shapes 1,32768,16,128 --json "$OUT/kda_op.json" > "$OUT/kda_op.log" 2>&1
echo "== kda op"; tail -n 6 "$OUT/kda_op.log"
# issue 14: gdn-1.3b sp=2's gradient all-reduces are scheduled in a chain over the last ~12% of the
# step's instructions (notes/sp_overhead.md, session 9), each beside 0-4 matmuls: XLA's latency-hiding
# scheduler with an analytical cost model of the collectives, then with two in flight at once
LHS=--xla_gpu_enable_latency_hiding_scheduler=true
XLA_FLAGS="$LHS --xla_gpu_enable_analytical_latency_estimator=true" timeout 130 python3 $TS --preset gdn-1.3b --remat none --sp 2 --iters 6 --json "$OUT/gdn_sp2_analytical.json" > "$OUT/gdn_sp2_analytical.log" 2>&1
echo "== gdn sp2 analytical estimator"; grep -E "row:|Error" "$OUT/gdn_sp2_analytical.log" | tail -n 2
XLA_FLAGS="$LHS --xla_gpu_experimental_parallel_collective_overlap_limit=2" timeout 130 python3 $TS --preset gdn-1.3b --remat none --sp 2 --iters 6 --json "$OUT/gdn_sp2_overlap2.json" > "$OUT/gdn_sp2_overlap2.log" 2>&1
echo "== gdn sp2 two collectives in flight"; grep -E "row:|Error" "$OUT/gdn_sp2_overlap2.log" | tail -n 2
