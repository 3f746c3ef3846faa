#!/usr/bin/env bash
# session 22, call D (1xH200, warm after call C): kda-1.3b's training step with bounded gates (session
# 19: 859.5 ms) on this session's KDA
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 220 python3 benchmarks/train_step.py --preset kda-1.3b --iters 6 --gate-lower-bound -5 --json $OUT/kda13b_bound5.json > $OUT/kda13b_bound5.log 2>&1
echo "== kda-1.3b bound -5 rc=$?"; grep -E "row:|Error|ms" $OUT/kda13b_bound5.log | tail -n 4 | cut -c1-250
