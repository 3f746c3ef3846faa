#!/usr/bin/env bash
# session 9 call D (2xH200): kda-1.3b sp=2 alone (call C's sp 1/2 run was stopped at 330 s inside
# the sp=2 row's compile), the session's remaining device time
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
timeout 440 python3 benchmarks/train_step.py --preset kda-1.3b --remat none --sp 2 --warmup 1 --iters 4 --json "$OUT/kda_sp2.json" 2>&1 | grep -v "^WARNING" | tee "$OUT/kda_sp2.log" | grep -E "row:|Error|compil"
