#!/usr/bin/env bash
# session 7 last call (one H200): KDA with the stored score blocks (issue 13)
cd "$(dirname "$0")"
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 215 python3 benchmarks/delta_rule_sweep.py --ops kda --budget 150 --labels default store_scores=True num_warps_bwd=4 store_scores=True,num_warps_bwd=4 --json "$OUT/kda_scores.json" > "$OUT/kda_scores.log" 2>&1
grep -E "^kda" "$OUT/kda_scores.log" | cut -c1-300
timeout 85 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "stored_scores" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "== gpu tests"; tail -n 3 "$OUT/gpu_tests.log"
