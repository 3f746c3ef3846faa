#!/usr/bin/env bash
# session 15, call H (1xH200): each rank's block compute at sp=2 with 8K-token documents and with
# one 64K document, after the backward's NaN guard left dK/dV (call G: 27.99 against Pallas 26.33 ms)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
for n in 8192 65536; do
  timeout 100 python3 benchmarks/softmax_rank_work.py --sp 2 --doc-len $n --impls cudnn_blocks pallas --json $OUT/rank_work_docs$n.json > $OUT/rank_work_docs$n.log 2>&1
  echo "== rank work docs $n rc=$?"; grep -v Warning $OUT/rank_work_docs$n.log | cut -c1-250 | tail -n 8
done
