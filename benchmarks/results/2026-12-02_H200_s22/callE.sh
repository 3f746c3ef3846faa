#!/usr/bin/env bash
# session 22, call E (1xH200): KDA with 32-row tiles in every chunk kernel (channel_rows=32; the
# bounded form needs each tile's half-span of log gates <= 40, so about >= -2.5 per token; the
# benchmark's gates are well inside) against the default's 16-row tiles, with device time by kernel
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 250 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 200 --profile /tmp/prof --labels default channel_rows=32 --json $OUT/kda_rows32.json > $OUT/kda_rows32.log 2>&1
echo "== kda rows32 rc=$?"; grep -vE "^\{" $OUT/kda_rows32.log | grep -E "device time|gated_delta_rule_(wy|output|state)|kda \|" | cut -c1-120 | head -30
