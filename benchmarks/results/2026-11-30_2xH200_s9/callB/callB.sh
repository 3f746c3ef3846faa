#!/usr/bin/env bash
# session 9 call B (2xH200): linear attention under grouped heads at D = 128 (call A's linear-llama3-1b
# step failed: shared memory 233,472 > 232,448 bytes): GPU tests and a per-config probe, then the
# linear-llama3-1b row (issue 20 item 6); gdn-1.3b sp 1/2 with split projections by default and the
# short conv's halo without the copy of the shard (issue 14)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
TS=benchmarks/train_step.py
D=benchmarks/results/2026-11-30_2xH200_s9/callB
( CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -m gpu tests/pallas_kernels/test_pallas_triton.py -k "grouped or head_dims" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 120 python3 $D/la_gqa_smem.py > "$OUT/la_gqa.log" 2>&1 ) &
wait
echo "== gpu tests"; tail -n 5 "$OUT/gpu_tests.log"
echo "== la gqa"; grep "Hk=" "$OUT/la_gqa.log"
timeout 150 python3 $TS --preset linear-llama3-1b --remat none --sp 1 2 --json "$OUT/llama.json" > "$OUT/llama.log" 2>&1
echo "== llama"; grep -E "row:|Error" "$OUT/llama.log" | tail -n 4
timeout 200 python3 $TS --preset gdn-1.3b --remat none --sp 1 2 --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 4
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json
