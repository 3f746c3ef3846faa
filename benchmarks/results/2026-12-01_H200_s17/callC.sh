#!/usr/bin/env bash
# session 17, call C (1xH200): per-channel diagonal tiles factored around their middle row where the
# factors stay below e^40, the exact pair tensor / levels otherwise (lax.cond per tile inside the
# kernels): KDA and GLA GPU tests (a new case with gates down to -7 per token takes both branches),
# KDA sweep and check, KDA with strong gates (every tile on the fallback), GLA default
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -k "kda or gla or channel" tests/pallas_kernels/test_gated_delta_rule_pallas.py tests/pallas_kernels/test_gla_pallas.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|^FAILED|Error" $OUT/gpu_tests.log | tail -n 20 | cut -c1-300
timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 150 --labels default wy_bwd_split=True splits=1 splits=2 num_warps_bwd=8 splits=1,block_e=16 --check --json $OUT/sweep_kda.json > $OUT/sweep_kda.log 2>&1
echo "== sweep rc=$?"; grep -E "^kda " $OUT/sweep_kda.log | cut -c1-400
timeout 90 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --labels default --gate-scale 200 --check --json $OUT/sweep_kda_strong.json > $OUT/sweep_kda_strong.log 2>&1
echo "== strong rc=$?"; grep -E "^kda " $OUT/sweep_kda_strong.log | cut -c1-400
timeout 100 python3 benchmarks/gla_sweep.py --reps 8 --labels default --check --json $OUT/gla.json > $OUT/gla.log 2>&1
echo "== gla rc=$?"; grep -v -i warn $OUT/gla.log | tail -n 6 | cut -c1-400
