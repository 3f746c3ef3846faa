#!/usr/bin/env bash
# session 20, call E (1xH200): the scalar-decay linear attention's default configs where shared memory
# is tightest (float32 / 128, bf16 / 256, float32 / 256; no decay, g_gamma, g), compiled and run; then
# the float32 delta-rule defaults timed (GDN new; KDA now with 2 state stages) at (1, 4096, 16, 128).
# As run, tests/pallas_kernels/test_pallas_triton.py had test_gpu_defaults_launch_per_dtype_and_head_dim
# with the 9 cases above; after this call it became test_gpu_float32_d128_default_launches (the 3 that
# passed) and the CPU test test_compiled_kernels_refuse_heads_wider_than_128, so "-k defaults_launch"
# below selects nothing in later trees
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
show() { grep -E '"label"' $1 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"; }
timeout 210 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_pallas_triton.py -k "defaults_launch" -rA > $OUT/gpu_tests_la_defaults.log 2>&1
echo "== gpu tests linear attention defaults rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|RESOURCE" $OUT/gpu_tests_la_defaults.log | cut -c1-250 | tail -n 14
timeout 130 python3 benchmarks/delta_rule_sweep.py --ops gdn kda --dtype float32 --shape 1,4096,16,128 --reps 5 --budget 55 --labels default --json $OUT/sweep_f32.json > $OUT/sweep_f32.log 2>&1
echo "== f32 rc=$?"; show $OUT/sweep_f32.log
