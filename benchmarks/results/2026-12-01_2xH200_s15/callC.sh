#!/usr/bin/env bash
# session 15, call C (1xH200): cuDNN block pairs cut as the zig-zag ring and TokenRing cut them (one
# call per visible chunk pair, merged by the online softmax), per rank at sp = 1, 2, 4 on this GPU
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 400 python3 benchmarks/softmax_rank_work.py --sp 1 2 4 --pairs --impls cudnn_blocks --json $OUT/rank_work_pairs.json > $OUT/rank_work_pairs.log 2>&1
echo "== rank work pairs rc=$?"; grep -v Warning $OUT/rank_work_pairs.log | cut -c1-250 | tail -n 30
