#!/usr/bin/env bash
# session 16, call C (1xH200): the gated delta rule's scans over splits unrolled (new) against
# lax.scan loops (old, set back by sed in this copy only): GDN at the default (one split) and split
# configs, KDA at its default (split), (1, 32768, 16, 128) bf16 fwd+bwd; device profile of the new
# 4-split GDN
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
for variant in new old; do
  if [ $variant = old ]; then sed -i 's/, unroll=True//' pallas_kernels/gated_delta_rule/layout.py; fi
  grep -c 'unroll=True' pallas_kernels/gated_delta_rule/layout.py
  prof=""; if [ $variant = new ]; then prof="--profile /tmp/prof_c"; fi
  timeout 200 python3 benchmarks/delta_rule_sweep.py --ops gdn --reps 20 --labels default splits=2 splits=4 block_e=64,splits=4 $prof --json $OUT/gdn_$variant.json > $OUT/gdn_$variant.log 2>&1
  echo "== gdn $variant rc=$?"; grep -v Warning $OUT/gdn_$variant.log | grep -E "^gdn \||idle|device time|transition|local|Memcpy" | cut -c1-170 | head -n 40
  timeout 150 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 10 --labels default --json $OUT/kda_$variant.json > $OUT/kda_$variant.log 2>&1
  echo "== kda $variant rc=$?"; grep -v Warning $OUT/kda_$variant.log | tail -n 6 | cut -c1-170
done
