#!/usr/bin/env bash
# session 8 call C (2xH200): gdn-1.3b step profile with the device idle time (issue 14) beside the GDN
# state-pass splits at the model's value heads (Hv = 32)
set -u
export PYTHONUNBUFFERED=1
ROOT=$PWD
( PYTHONPATH=$ROOT CUDA_VISIBLE_DEVICES=0 timeout 230 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --profile "$OUT/prof_gdn" --json "$OUT/gdn13b_prof.json" > "$OUT/gdn13b_prof.log" 2>&1 ) &
( PYTHONPATH=$ROOT CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/delta_rule_sweep.py --ops gdn --shape 1,32768,32,128 --budget 150 --labels default splits=1 splits=2 splits=16 --json "$OUT/gdn_h32_splits.json" > "$OUT/gdn_h32_splits.log" 2>&1 ) &
wait
echo "== gdn13b profile"; grep -vE "^\s*$" "$OUT/gdn13b_prof.log" | tail -n 32
echo "== gdn h32 splits"; grep -E "^gdn" "$OUT/gdn_h32_splits.log"
mkdir -p "$OUT/trace"; cp "$(find "$OUT/prof_gdn" -name 'perfetto_trace.json.gz' | head -1)" "$OUT/trace/" 2>/dev/null; rm -rf "$OUT/prof_gdn"; ls -la "$OUT/trace"
