#!/usr/bin/env bash
# Session 26, call D: the GPU tests call B's limit left out (after session 25's changes), fastest first:
# the linear-attention kernels, the delta-rule cases not run in call C, GLA; one pytest each so a
# time limit leaves the others' summaries.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/s26D}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_pallas_triton.py > "$OUT/gpu_tests_linear.log" 2>&1
echo "== linear attention (rc $?)"; tail -n 3 "$OUT/gpu_tests_linear.log"
timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py \
  --deselect "tests/pallas_kernels/test_gated_delta_rule_pallas.py::test_compiled_default_with_bf16_inverse" \
  --deselect "tests/pallas_kernels/test_gated_delta_rule_pallas.py::test_compiled_kda_default_with_gate_lower_bound" \
  > "$OUT/gpu_tests_delta.log" 2>&1
echo "== delta rule (rc $?)"; tail -n 3 "$OUT/gpu_tests_delta.log"
timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gla_pallas.py > "$OUT/gpu_tests_gla.log" 2>&1
echo "== gla (rc $?)"; tail -n 3 "$OUT/gpu_tests_gla.log"
