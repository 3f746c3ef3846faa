#!/usr/bin/env bash
# session 21, call E (1xH200, warm after call D; the command as run): more rows at (1, 16384, 16, 256),
# bf16, both scalar decays: forward stages, splits (min_programs) and 128-token chunks with 8 warps
mkdir -p $OUT/callE; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; timeout 300 python3 benchmarks/kernels.py --impls project --decay g_gamma g --shapes 1,16384,16,256 --timeout 100 --configs "num_warps=8" "num_warps=8,num_stages=1" "num_warps=8,num_stages=3" "num_warps=8,min_programs=264" "num_warps=8,min_programs=1056" "num_warps=8,chunk=128" --json $OUT/callE/wide_sweep2.json > $OUT/callE/wide_sweep2.log 2>&1; echo rc=$?; grep -vE "^\s*$" $OUT/callE/wide_sweep2.log | grep -v '^\[' | tail -n 14 | cut -c1-200
