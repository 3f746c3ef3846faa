#!/usr/bin/env bash
# session 21, call A2 (1xH200, warm after call A; the command as run): call A's float32 probe again with
# a longer limit (Triton's float32 compiles at head dim 256 take minutes; the second config was cut)
mkdir -p $OUT/callA2; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; timeout 400 python3 benchmarks/wide_heads_probe.py --dtype float32 --d 256 --decay g --shape 1,512,2 --time 1,4096,8 --reps 3 '{"split_dkdv": true, "num_stages_bwd": 1}' '{"split_dkdv": true, "num_stages_bwd": 1, "num_stages": 1}' --json $OUT/callA2/f32_g.json 2>&1 | tee $OUT/callA2/f32_g.log | grep -E '^\{|Error' | cut -c1-300
