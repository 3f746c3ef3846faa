#!/usr/bin/env bash
# session 16, call G (1xH200): with the document bounds no longer waiting on the host, each rank's
# block compute with packed documents, cudnn_blocks against Pallas, at sp=2 and 4 and documents of
# 8K, 16K and 32K tokens (session 15: one 64K document 119.3 against 162.1 ms at sp=2)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
for n in 16384 32768 8192; do
  timeout 150 python3 benchmarks/softmax_rank_work.py --sp 2 4 --doc-len $n --impls cudnn_blocks pallas --reps 3 --json $OUT/rank_work_docs$n.json > $OUT/rank_work_docs$n.log 2>&1
  echo "== rank work docs $n rc=$?"; grep -E "slowest|one device, whole" $OUT/rank_work_docs$n.log | cut -c1-200
done
