#!/usr/bin/env bash
# session 7 call 3 (2xH200): TNL-1B sp=2 with split projections (issue 20); per-channel diagonal tiles
# key row by key row (HEAD) against the [16,16,D] form (before/ = d9562ff), KDA and GLA (issues 13/15);
# gdn-1.3b with the tf32 whole-chunk WY default (issue 14)
cd "$(dirname "$0")"
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
ROOT=$PWD
PYTHONPATH=$ROOT timeout 170 python3 benchmarks/train_step.py --preset tnl-1b --remat none --split-projections --sp 2 --json "$OUT/tnl_sp2_split.json" > "$OUT/tnl_sp2_split.log" 2>&1
echo "== tnl sp2 split"; grep -E "row:|Error" "$OUT/tnl_sp2_split.log" | tail -n 3
lane() {  # tree, gpu, tag
  cd "$1"; export PYTHONPATH=$PWD CUDA_VISIBLE_DEVICES=$2 XLA_PYTHON_CLIENT_PREALLOCATE=false
  timeout 130 python3 benchmarks/delta_rule_sweep.py --ops kda --budget 100 --check --labels default --json "$OUT/kda_$3.json" > "$OUT/kda_$3.log" 2>&1
  timeout 130 python3 benchmarks/gla_sweep.py --budget 100 --labels default split_grads,recompute_dz --json "$OUT/gla_$3.json" > "$OUT/gla_$3.log" 2>&1
}
( lane "$ROOT" 0 new; cd "$ROOT"; PYTHONPATH=$ROOT CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gated_delta_rule_pallas.py tests/pallas_kernels/test_gla_pallas.py -k "kda or gla" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ) &
( lane "$ROOT/before" 1 old; cd "$ROOT"; unset XLA_PYTHON_CLIENT_PREALLOCATE; PYTHONPATH=$ROOT CUDA_VISIBLE_DEVICES=1 timeout 130 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --json "$OUT/gdn13b_none_tf32.json" > "$OUT/gdn13b_none_tf32.log" 2>&1 ) &
wait
for t in new old; do echo "== kda $t"; grep -E "^kda" "$OUT/kda_$t.log" | cut -c1-300; echo "== gla $t"; grep -E "^\{" "$OUT/gla_$t.log" | python3 -c "import sys,json; [print(r.get('label'), r.get('fwd_ms'), r.get('fwd_bwd_ms'), r.get('error','')) for r in map(json.loads, sys.stdin)]"; done
echo "== gpu tests"; tail -n 4 "$OUT/gpu_tests.log"
echo "== gdn13b"; grep -E "row:|Error" "$OUT/gdn13b_none_tf32.log" | tail -n 3
