#!/usr/bin/env bash
# session 10 call E (2xH200, the last ~4.5 min of device time): the sharded delta rule on two ranks
# without initial or final state forms no transition Φ (only M, over the E value columns, one run):
# its two GPU test cases against the float32 recurrence, then gdn-1.3b sp 1/2 in one run (issue 14)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
timeout 75 python3 -m pytest -q -m gpu tests/lasp_jax/test_lasp_gated_delta_rule.py -k "False" -p no:cacheprovider > "$OUT/gpu_tests_sp.log" 2>&1
echo "== gpu tests (2 GPUs, no states)"; tail -n 2 "$OUT/gpu_tests_sp.log"
timeout 185 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --sp 1 2 --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp 1/2"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 3
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json
