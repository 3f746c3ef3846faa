#!/usr/bin/env bash
# session 17, call E (1xH200): a rank's own KDA work under sp (the split entry points chained on one
# GPU, no collectives; benchmarks/delta_rule_rank_work.py) with the factored diagonal tiles, beside
# the single-device op
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 benchmarks/delta_rule_rank_work.py --ops kda --runs 8 --block-e 32 --reps 5 --json $OUT/rank_work_kda.json > $OUT/rank_work_kda.log 2>&1
echo "== rank work rc=$?"; grep -v -i warn $OUT/rank_work_kda.log | tail -n 12 | cut -c1-250
