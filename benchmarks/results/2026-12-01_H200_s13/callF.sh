#!/usr/bin/env bash
# session 13, call F (1xH200): GDN beside jax-linear-attention with the forward+backward timing
# returning o as well (benchmarks/timing.forward_and_grads): before, jax.vjp(...)[1](do) let XLA
# drop our forward output kernel (GDN's backward does not read o), so the fwd+bwd rows missed it;
# device time by kernel of both (DELTA_RULE_PROFILE) to stderr
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
DELTA_RULE_PROFILE=$OUT/prof timeout 200 python3 benchmarks/delta_rule.py --ops gdn --impls project jla --shapes 1,32768,16,128 4,8192,16,128 --timeout 80 --json $OUT/delta_op_f.json > $OUT/delta_op_f.log 2> $OUT/delta_op_f.err
echo "== delta op rc=$?"; grep -E "\|" $OUT/delta_op_f.log | tail -n 6; grep -E "fwd\+bwd|pallas|mosaic|custom" $OUT/delta_op_f.log | head -60
