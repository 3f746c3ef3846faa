#!/usr/bin/env bash
# session 8 call D (2xH200): the state-pass splits of the delta-rule kernels at the benchmark shapes
# and the model's (Hv = 32), GDN and KDA, one lane per GPU
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=benchmarks/delta_rule_sweep.py
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python3 $S --ops gdn --budget 110 --labels default splits=1 splits=2 splits=4 num_warps_bwd=4 --json "$OUT/gdn16.json" > "$OUT/gdn16.log" 2>&1
  timeout 80 python3 $S --ops gdn --shape 4,8192,16,128 --budget 50 --labels default splits=1 --json "$OUT/gdn_b4.json" > "$OUT/gdn_b4.log" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 90 python3 $S --ops gdn --shape 1,32768,32,128 --base splits=1 --budget 50 --labels default num_warps_bwd=4 --json "$OUT/gdn32_s1.json" > "$OUT/gdn32_s1.log" 2>&1
  timeout 140 python3 $S --ops kda --budget 100 --labels default splits=1 splits=2 --json "$OUT/kda16.json" > "$OUT/kda16.log" 2>&1
) &
wait
for f in gdn16 gdn_b4 gdn32_s1 kda16; do echo "== $f"; grep -E "^(gdn|kda) \|" "$OUT/$f.log"; grep -E "Error" "$OUT/$f.log" | head -3; done
