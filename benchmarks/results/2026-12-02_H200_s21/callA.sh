#!/usr/bin/env bash
# session 21, call A (1xH200): which tilings of the scalar-decay linear attention launch with 256-wide
# heads (its default asked 361472 B of shared memory in bf16, session 20), their error against the XLA
# path and forward+backward time at (1, 16384, 8, 256) beside the XLA path; bf16 with a per-token
# decay first, then the candidates with no decay and in float32
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
probe() { name=$1; shift; timeout $1 python3 benchmarks/wide_heads_probe.py "${@:2}" --json $OUT/$name.json > $OUT/$name.log 2>&1
  echo "== $name rc=$?"; grep -E '^\{' $OUT/$name.log | cut -c1-260; grep -E "Error|error" $OUT/$name.log | grep -v '^{' | tail -n 3 | cut -c1-300; }
probe bf16_g 330 --dtype bfloat16 --d 256 --decay g --time 1,16384,8 '{}' \
  '{"split_dkdv": true}' '{"split_dkdv": true, "num_stages_bwd": 2}' '{"split_dkdv": true, "num_stages_bwd": 1}' \
  '{"split_dkdv": true, "num_stages_bwd": 2, "num_stages": 1}' \
  '{"split_dkdv": true, "block_dkdv": 32, "block_d": 32, "block_e": 32}' \
  '{"split_dkdv": true, "block_dkdv": 32, "block_d": 32, "block_e": 32, "num_stages_bwd": 2}' \
  '{"split_dkdv": true, "num_stages_bwd": 2, "num_warps": 8}' \
  '{"chunk": 32, "split_dkdv": true, "num_stages_bwd": 2}'
probe bf16_none 100 --dtype bfloat16 --d 256 --decay none --time 1,16384,8 '{"split_dkdv": true, "num_stages_bwd": 2}' \
  '{"split_dkdv": true, "num_stages_bwd": 1}' '{"split_dkdv": true, "block_dkdv": 32, "block_d": 32, "block_e": 32, "num_stages_bwd": 2}'
probe f32_g 120 --dtype float32 --d 256 --decay g --time 1,4096,8 '{"split_dkdv": true, "num_stages_bwd": 1}' \
  '{"split_dkdv": true, "num_stages_bwd": 1, "num_stages": 1}' \
  '{"split_dkdv": true, "block_dkdv": 32, "block_d": 32, "block_e": 32, "num_stages_bwd": 1, "num_stages": 1}'
