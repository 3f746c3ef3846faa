#!/usr/bin/env bash
# session 12, call D (1xH200, the machine of call C still warm): kda-1.3b training step on one GPU
# with the session's KDA kernels (levels in the diagonal cotangents, 4 backward warps)
mkdir -p $OUT; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; timeout 250 python3 benchmarks/train_step.py --preset kda-1.3b --remat none --sp 1 --json $OUT/kda_step.json > $OUT/kda_step.log 2>&1; echo "rc=$?"; tail -n 15 $OUT/kda_step.log
