#!/usr/bin/env bash
# session 19, call E (1xH200, on call D's warm machine): float32 KDA without the pregated state passes
# but with 2 state stages (the in-kernel form's shared memory fits), against call D's pregated default
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 100 python3 benchmarks/delta_rule_sweep.py --ops kda --dtype float32 --shape 1,4096,16,128 --reps 4 --budget 60 --base pregated_state=False num_stages_state=2 --labels default num_stages_state=1 --json $OUT/sweep_kda_f32_stages.json
