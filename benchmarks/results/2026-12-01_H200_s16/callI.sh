#!/usr/bin/env bash
# session 16, call I (1xH200): the flash kernels' GPU tests after the default tiles were fitted to
# shared memory (call H: the fp32 96-wide case asked 384 KiB at 128x128 forward tiles and failed);
# a new fp32 256-wide case
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_flash_attention.py > $OUT/gpu_tests_flash.log 2>&1
echo "== flash gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E  " $OUT/gpu_tests_flash.log | tail -n 12 | cut -c1-300
