#!/usr/bin/env bash
# session 24, call D (1xH200): the bf16 defaults with the inverse on bf16 operands, GDN and KDA beside
# jax-linear-attention at the three shapes (one process per contender and shape)
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
timeout 230 env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/delta_rule.py --ops gdn --impls project jla --timeout 70 --json $OUT/delta_gdn.json > $OUT/delta_gdn.log 2>&1
echo "== gdn rc=$?"; grep -vE "^\{" $OUT/delta_gdn.log | tail -n 8 | cut -c1-200
timeout 290 env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/delta_rule.py --ops kda --impls project jla --timeout 90 --json $OUT/delta_kda.json > $OUT/delta_kda.log 2>&1
echo "== kda rc=$?"; grep -vE "^\{" $OUT/delta_kda.log | tail -n 8 | cut -c1-200
