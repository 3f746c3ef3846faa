#!/usr/bin/env bash
# session 20, call C (1xH200): float32 GDN at head dim 256, which column-block width fits
mkdir -p $OUT/callC; PYTHONPATH=$PWD PYTHONUNBUFFERED=1 timeout 450 python3 benchmarks/results/2026-12-02_H200_s20/probe_f32_256.py "" block_cols=64 block_cols=32 block_cols=16 2>&1 | grep -v Warning | tee $OUT/callC/probe.log | tail -12
