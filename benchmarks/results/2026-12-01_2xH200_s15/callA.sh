#!/usr/bin/env bash
# session 15, call A (2xH200): session 14's untimed stacked products. KDA (GPU 0) and GLA (GPU 1)
# at the same time, each its GPU test and then its sweep against the default; then the delta rule
# under sp on both GPUs with sessions 12-14's kernels
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k stacked > $OUT/gpu_tests_kda_stacked.log 2>&1
  timeout 240 python3 benchmarks/delta_rule_sweep.py --ops kda --labels default stacked_pairs=True stacked_pairs=True,num_warps_bwd=8 stacked_pairs=True,block_cols=64 --budget 180 --check --profile $OUT/prof --json $OUT/sweep_kda_stacked.json > $OUT/sweep_kda_stacked.log 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py -k stacked > $OUT/gpu_tests_gla_stacked.log 2>&1
  timeout 220 python3 benchmarks/gla_sweep.py --labels default stacked_pairs stacked_pairs,grads_warps=4 stacked_pairs,recompute_dz --budget 170 --check --json $OUT/gla_stacked.json > $OUT/gla_stacked.log 2>&1
) &
wait
echo "== kda gpu tests"; tail -n 3 $OUT/gpu_tests_kda_stacked.log
echo "== kda sweep"; grep -E "^kda |gated_delta_rule_|Error" $OUT/sweep_kda_stacked.log | cut -c1-200
echo "== gla gpu tests"; tail -n 3 $OUT/gpu_tests_gla_stacked.log
echo "== gla sweep"; grep -E "^(default|stacked)|Error" $OUT/gla_stacked.log | cut -c1-200
rm -rf $OUT/prof
timeout 200 python3 benchmarks/delta_rule_sp.py --ops gdn kda --strategies allgather ring --no-peer --json $OUT/delta_sp.json > $OUT/delta_sp.log 2>&1
echo "== delta rule sp rc=$?"; grep -E "^\{|Error" $OUT/delta_sp.log | cut -c1-300
