#!/usr/bin/env bash
# session 17, call A (1xH200): cudnn_blocks GPU tests after session 16's K/V rotation under one cond;
# KDA's state-pass settings re-swept on today's kernels (last swept in session 8) and the two-kernel
# WY backward (last timed for KDA in session 5)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -k "cudnn_blocks_equal or on_gpus" tests/pallas_kernels/test_flash_attention_cudnn_blocks.py tests/lasp_jax/test_softmax_cudnn_blocks.py > $OUT/gpu_tests_cudnn_blocks.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|^FAILED" $OUT/gpu_tests_cudnn_blocks.log | tail -n 20 | cut -c1-300
timeout 400 python3 benchmarks/delta_rule_sweep.py --ops kda --budget 320 --reps 8 --labels default wy_bwd_split=True splits=1 splits=2 splits=4 block_e=16 num_warps_state=8 num_stages_state=2 block_e=64,splits=4 splits=1,block_e=16 splits=2,block_e=16 splits=4,block_e=16 splits=16,block_e=64 --json $OUT/sweep_kda.json > $OUT/sweep_kda.log 2>&1
echo "== sweep rc=$?"; grep -E '"label"' $OUT/sweep_kda.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['label'], r.get('fwd_ms'), r.get('fwd_bwd_ms'), str(r.get('error',''))[:150])"
