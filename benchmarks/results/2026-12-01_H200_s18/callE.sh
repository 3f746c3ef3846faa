#!/usr/bin/env bash
# session 18, call E (1xH200): the kda-1.3b training step (32K tokens, one GPU, remat dots) with the
# layer's unbounded softplus gates (A ~ U(1, 16): decays to -11 per token, so the exact kernels behind
# the cond) and with gate_lower_bound=-5 (the factored ones); a rank's own KDA work under sp
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 250 python3 benchmarks/train_step.py --preset kda-1.3b --iters 6 --json $OUT/kda13b_unbounded.json > $OUT/kda13b_unbounded.log 2>&1
echo "== kda-1.3b unbounded rc=$?"; grep -E "kda-1.3b|Error" $OUT/kda13b_unbounded.log | tail -n 4 | cut -c1-250
timeout 250 python3 benchmarks/train_step.py --preset kda-1.3b --iters 6 --gate-lower-bound -5 --json $OUT/kda13b_bound5.json > $OUT/kda13b_bound5.log 2>&1
echo "== kda-1.3b bound -5 rc=$?"; grep -E "kda-1.3b|Error" $OUT/kda13b_bound5.log | tail -n 4 | cut -c1-250
timeout 100 python3 benchmarks/delta_rule_rank_work.py --ops kda --runs 8 --block-e 32 --reps 8 --json $OUT/rank_work_kda.json > $OUT/rank_work_kda.log 2>&1
echo "== kda rank work rc=$?"; tail -n 6 $OUT/rank_work_kda.log | cut -c1-250
