#!/usr/bin/env bash
# session 21, call D (1xH200, warm after call C; the command as run): launch-parameter rows of the
# scalar-decay linear attention at (1, 16384, 16, 256), bf16, constant decay, over the new default
mkdir -p $OUT/callD; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; timeout 420 python3 benchmarks/kernels.py --impls project --decay g_gamma --shapes 1,16384,16,256 --timeout 120 --configs "" "block_e=128" "num_warps=8" "block_e=128,num_warps=8" "block_e=32" "block_dkdv=128" "block_d=128" "num_warps_bwd=4" "block_d=32,block_dkdv=32" --json $OUT/callD/wide_sweep.json > $OUT/callD/wide_sweep.log 2>&1; echo rc=$?; grep -vE "^\s*$" $OUT/callD/wide_sweep.log | grep -v '^\[' | tail -n 12 | cut -c1-200
