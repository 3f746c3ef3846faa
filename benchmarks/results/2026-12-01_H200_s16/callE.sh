#!/usr/bin/env bash
# session 16, call E (1xH200): after the split entry points' default moved to 64-wide value blocks and
# twice the runs where the shard is cut (call D): the GPU test of that config (with documents) and the
# other scalar-gate GPU cases, then a rank's own work at the new default against the single-device op
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "gdn" > $OUT/gpu_tests_gdn.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|^FAILED" $OUT/gpu_tests_gdn.log | tail -n 20 | cut -c1-300
timeout 200 python3 benchmarks/delta_rule_rank_work.py --ops gdn --runs 2 4 --block-e 32 64 --json $OUT/gdn_rank_work.json > $OUT/gdn_rank_work.log 2>&1
echo "== gdn rank work rc=$?"; grep -v Warning $OUT/gdn_rank_work.log | cut -c1-200
