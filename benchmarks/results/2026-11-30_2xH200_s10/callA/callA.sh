#!/usr/bin/env bash
# session 10 call A (2xH200): issue 20 item 5, the longest-sequence search itself (TNL-1B, scanned
# layers, remat offload, doubling from 1M to a 2M cap, then one bisection step of 512K), on GPU 0,
# beside the single-GPU kernel tests on GPU 1; then the two-GPU sharded delta-rule test (the transition
# pass without [U | 0], session 9, never run on a GPU)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
TS=benchmarks/train_step.py
( CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 330 python3 $TS --preset tnl-1b --scan-layers \
    --search-longest --search-only --search-remat offload --mlp-chunk 65536 --tokens-per-device 1048576 \
    --max-tokens 2097152 --granularity 524288 --json "$OUT/longest.json" > "$OUT/longest.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 280 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gated_delta_rule_pallas.py \
    tests/pallas_kernels/test_pallas_triton.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ) &
wait
echo "== longest"; grep -E "tokens/device|tokens per device|Error" "$OUT/longest.log" | tail -n 6
echo "== gpu tests (1 GPU)"; tail -n 3 "$OUT/gpu_tests.log"
timeout 200 python3 -m pytest -q -m gpu tests/lasp_jax/test_lasp_gated_delta_rule.py -p no:cacheprovider > "$OUT/gpu_tests_sp.log" 2>&1
echo "== gpu tests (2 GPUs)"; tail -n 3 "$OUT/gpu_tests_sp.log"
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json
