#!/usr/bin/env bash
# session 9 call C (2xH200): the D = 128 default-tiling GPU tests (grouped or not, decay or not);
# kda-1.3b sp 1/2 with split projections by default (issue 14: sp=2 never measured);
# gdn-1.3b sp=2 with NCCL's Simple protocol (call A's profile: the bf16 gradient all-reduces ran
# RING_LL, 28.9 ms per step)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
TS=benchmarks/train_step.py
timeout 90 python3 -m pytest -q -m gpu tests/pallas_kernels/test_pallas_triton.py -k "d128_default" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "== gpu tests"; tail -n 3 "$OUT/gpu_tests.log"
timeout 330 python3 $TS --preset kda-1.3b --remat none --sp 1 2 --iters 5 --json "$OUT/kda_sp.json" > "$OUT/kda_sp.log" 2>&1
echo "== kda sp"; grep -E "row:|Error" "$OUT/kda_sp.log" | tail -n 4
NCCL_PROTO=Simple timeout 130 python3 $TS --preset gdn-1.3b --remat none --sp 2 --iters 6 --json "$OUT/gdn_sp2_simple.json" > "$OUT/gdn_sp2_simple.log" 2>&1
echo "== gdn sp2 NCCL_PROTO=Simple"; grep -E "row:|Error" "$OUT/gdn_sp2_simple.log" | tail -n 3
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json
