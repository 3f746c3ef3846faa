#!/usr/bin/env bash
# session 9 call A (2xH200): the delta rule's GPU tests (kernels, and the sharded op with the compiled
# split kernels) beside gdn-1.3b with split projections; the linear-llama3-1b row (issue 20 item 6);
# gdn-1.3b sp 1/2 profiled with the scheduler, its optimized HLO kept to trace the fusions (issue 14)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
TS=benchmarks/train_step.py
( timeout 200 python3 -m pytest -q -m gpu tests/pallas_kernels/test_gated_delta_rule_pallas.py tests/lasp_jax/test_lasp_gated_delta_rule.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 150 python3 $TS --preset gdn-1.3b --remat none --split-projections --json "$OUT/gdn_split.json" > "$OUT/gdn_split.log" 2>&1 ) &
wait
echo "== gpu tests"; tail -n 5 "$OUT/gpu_tests.log"
echo "== gdn split"; grep -E "row:|Error" "$OUT/gdn_split.log" | tail -n 3
timeout 150 python3 $TS --preset linear-llama3-1b --remat none --sp 1 2 --json "$OUT/llama.json" > "$OUT/llama.log" 2>&1
echo "== llama"; grep -E "row:|Error" "$OUT/llama.log" | tail -n 4
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*train_step.*" timeout 220 python3 $TS --preset gdn-1.3b --remat none --sp 1 2 --profile /tmp/prof_gdn --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 4
ls -la /tmp/hlo | grep after_opt
for f in /tmp/hlo/*after_optimizations.txt; do gzip -c "$f" > "$OUT/$(basename "$f" | sed 's/[^A-Za-z0-9._-]/_/g' | cut -c1-80).gz"; done
t=$(find /tmp/prof_gdn -name '*.trace.json.gz' -o -name 'perfetto_trace.json.gz' | grep sp1 | head -n 1); [ -n "$t" ] && cp "$t" "$OUT/gdn_sp1_trace.json.gz"
ls -la $OUT
# at most 8 files come back: the logs and JSON in one archive
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json && ls -la
