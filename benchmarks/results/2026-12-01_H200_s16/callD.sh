#!/usr/bin/env bash
# session 16, call D (1xH200): a rank's own work in the sequence-parallel GDN (split entry points,
# without collectives) per shard config, against the single-device op at the shard's shape
# (1, 32768, 16, 128) bf16 fwd+bwd; session 15 measured the layer at 1.167x on 2xH200
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 420 python3 benchmarks/delta_rule_rank_work.py --ops gdn --runs 1 2 4 8 --block-e 16 32 64 --json $OUT/gdn_rank_work.json > $OUT/gdn_rank_work.log 2>&1
echo "== gdn rank work rc=$?"; grep -v Warning $OUT/gdn_rank_work.log | cut -c1-200
