#!/usr/bin/env bash
# session 17, call B (1xH200): KDA with each per-channel diagonal tile factored around its middle
# NOTE: LASP_DIAG_MID was a temporary switch in the device copy of products.py (never committed);
# the kept form is call D (pallas_triton.by_gates).
# row (one product, like the off-diagonal pairs; exact only for bounded gates) against today's pair
# tensor / levels, EXPERIMENT switch LASP_DIAG_MID in products.py; device time by kernel for both
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
for mid in 0 1; do
  LASP_DIAG_MID=$mid timeout 240 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --labels default wy_bwd_split=True --check --profile /tmp/prof_$mid --json $OUT/kda_mid$mid.json > $OUT/kda_mid$mid.log 2>&1
  echo "== mid=$mid rc=$?"; grep -v -i warn $OUT/kda_mid$mid.log | grep -E "label|ms|rel|check|Error|d[qkvg]" | cut -c1-300 | tail -n 60
done
