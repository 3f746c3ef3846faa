#!/usr/bin/env bash
# session 21, call B (1xH200): the scalar-decay linear attention with heads padded to 256 under the new
# default (split_dkdv, 2 backward stages in bf16): the GPU tests (grouped 256, D 192, E 200; three
# decays; documents; against the float64 recurrence), then the kernels beside flash-linear-attention
# and jax-linear-attention at (1, 16384, 16, 256), bf16
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_pallas_triton.py -k "wide_heads_default and not float32" -rA > $OUT/gpu_tests_wide.log 2>&1
echo "== gpu tests wide heads rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|RESOURCE" $OUT/gpu_tests_wide.log | cut -c1-250 | tail -n 14
PYTHONPATH=/tmp/site:$PWD timeout 320 python3 benchmarks/kernels.py --impls project fla jla --decay g_gamma g --shapes 1,16384,16,256 --timeout 100 --json $OUT/wide_peers.json > $OUT/wide_peers.log 2>&1
echo "== peers rc=$?"; grep -vE "^\s*$" $OUT/wide_peers.log | tail -n 25 | cut -c1-220
