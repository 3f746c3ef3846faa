#!/usr/bin/env bash
# Session 26, call C: call B's full GPU suite ran out of its 420 s after 29 passed (flash, cuDNN
# blocks, the first delta-rule cases; none failed). Here the defaults every user gets, after
# session 25's changes: GDN / KDA bf16 defaults, KDA with the model's gate floor, the
# linear-attention d128 defaults and bf16 decays, GLA's default.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/s26C}; mkdir -p "$OUT"
timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=20 \
  "tests/pallas_kernels/test_gated_delta_rule_pallas.py::test_compiled_default_with_bf16_inverse" \
  "tests/pallas_kernels/test_gated_delta_rule_pallas.py::test_compiled_kda_default_with_gate_lower_bound" \
  "tests/pallas_kernels/test_pallas_triton.py::test_gpu_d128_default_config" \
  "tests/pallas_kernels/test_pallas_triton.py::test_gpu_kernels_match_reference[g_gamma-bf16]" \
  "tests/pallas_kernels/test_gla_pallas.py::test_compiled_kernels_match_reference[default]" \
  > "$OUT/gpu_tests.log" 2>&1
echo "== gpu tests (rc $?)"; grep -E 'passed|failed|FAILED|Error|PASSED' "$OUT/gpu_tests.log" | tail -n 12; tail -n 25 "$OUT/gpu_tests.log" | grep -E 's (call|setup)' | head -12
