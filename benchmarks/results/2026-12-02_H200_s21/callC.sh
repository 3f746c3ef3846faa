#!/usr/bin/env bash
# session 21, call C (1xH200): call B's peer rows again, now that benchmarks/kernels.py gives the project
# kernels their default for the head dim and dtype (call B timed the 128 tiling at 256 and failed to
# launch it); flash-linear-attention gets 170 s per case (its autotuning at 256 ran past 100 s)
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
PYTHONPATH=/tmp/site:$PWD timeout 480 python3 benchmarks/kernels.py --impls project fla --decay g_gamma g --shapes 1,16384,16,256 --timeout 170 --json $OUT/wide_peers.json > $OUT/wide_peers.log 2>&1
echo "== peers rc=$?"; grep -vE "^\s*$" $OUT/wide_peers.log | grep -v '^\[' | tail -n 12 | cut -c1-220
