#!/usr/bin/env bash
# session 22, call A (1xH200): session 21's KDA default (chunk-local cumulative gates by the Pallas
# kernel) through every compiled KDA GPU test; then KDA's device time by kernel at (1, 32768, 16, 128)
# bf16 with XLA's optimized HLO dumped, to name the XLA fusions left outside the kernels
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT
timeout 360 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_gated_delta_rule_pallas.py -k kda -rA > $OUT/gpu_tests_kda.log 2>&1
echo "== gpu tests kda rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests_kda.log | cut -c1-200 | tail -n 14
XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" timeout 200 python3 benchmarks/delta_rule_sweep.py --ops kda --reps 8 --budget 150 --profile /tmp/prof --labels default --json $OUT/kda_profile.json > $OUT/kda_profile.log 2>&1
echo "== kda profile rc=$?"; grep -vE "^\{" $OUT/kda_profile.log | grep -E "device time|fusion|Pallas|kda \|" | cut -c1-160 | head -40
mkdir -p /tmp/hlo; for f in $(grep -l "gated_delta_rule_wy_bwd" /tmp/dump/*after_optimizations.txt 2>/dev/null); do cp $f /tmp/hlo/; done
ls /tmp/hlo | head; tar czf $OUT/hlo.tgz -C /tmp hlo; ls -la $OUT
