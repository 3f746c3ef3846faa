#!/usr/bin/env bash
# session 21, call G (1xH200, warm after call F; the command as run): call F's two KDA rows again
# without the profiler (call F's 200 s limit cut the second row)
mkdir -p $OUT/callG; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; timeout 125 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 10 --budget 100 --labels cumsum_kernel=True default --json $OUT/callG/sweep.json > $OUT/callG/sweep.log 2>&1; echo rc=$?; grep -E "^kda \|" $OUT/callG/sweep.log
