#!/usr/bin/env bash
# session 20, call D (1xH200): the float32 GDN default-config launch tests with the final rule
# (2 state stages; column blocks of at most 128, 64 past head dim 128)
mkdir -p $OUT/callD; PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k "defaults_launch and float32 and gdn" -rA > $OUT/callD/gpu_tests_f32_gdn.log 2>&1; echo rc=$?; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|RESOURCE" $OUT/callD/gpu_tests_f32_gdn.log | cut -c1-250
