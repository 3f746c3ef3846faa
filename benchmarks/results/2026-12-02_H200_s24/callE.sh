#!/usr/bin/env bash
# session 24, call E (1xH200): device time by kernel of the bf16 defaults (the inverse on bf16
# operands), GDN and KDA at (1, 32768, 16, 128), for docs/delta_rule.png and docs/kda.png
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 120 python3 benchmarks/delta_rule_sweep.py --ops gdn --reps 8 --budget 100 --profile /tmp/prof_gdn --labels default --json $OUT/gdn_profile.json > $OUT/gdn_profile.log 2>&1
echo "== gdn rc=$?"; grep -E "ms/step|device|^ +[0-9.]+ ms" $OUT/gdn_profile.log | head -n 14 | cut -c1-160
timeout 150 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 130 --profile /tmp/prof_kda --labels default --json $OUT/kda_profile.json > $OUT/kda_profile.log 2>&1
echo "== kda rc=$?"; grep -E "ms/step|device|^ +[0-9.]+ ms" $OUT/kda_profile.log | head -n 16 | cut -c1-160
