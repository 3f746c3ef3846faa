#!/usr/bin/env bash
# session 11, call B (2xH200): the zig-zag ring at HEAD against the tree before a904c66 (identity
# ppermutes skipped in the deal), traces kept; the GDN/KDA ops' device time by kernel
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 100 python3 benchmarks/hybrid.py --sp 2 --reps 5 --strategies zigzag_ring allgather --profile /tmp/zz_new --json $OUT/zz_new.json > $OUT/zz_new.log 2>&1
echo "== new rc=$?"; grep -E "  sp=" $OUT/zz_new.log
cp $(find /tmp/zz_new/zigzag_ring_sp2 -name "*.json.gz" | head -1) $OUT/zz_new_trace.json.gz
rm -rf /tmp/old && mkdir /tmp/old && cp -r lasp_jax pallas_kernels models benchmarks /tmp/old/ && cp runs_ab/deal_before.py /tmp/old/lasp_jax/softmax/deal.py
(cd /tmp/old && PYTHONPATH=/tmp/old timeout 100 python3 benchmarks/hybrid.py --sp 2 --reps 5 --strategies zigzag_ring allgather --profile /tmp/zz_old --json $OUT/zz_old.json > $OUT/zz_old.log 2>&1; echo "== old rc=$?")
grep -E "  sp=|exposed|SendRecv" $OUT/zz_old.log
cp $(find /tmp/zz_old/zigzag_ring_sp2 -name "*.json.gz" | head -1) $OUT/zz_old_trace.json.gz
timeout 150 python3 benchmarks/delta_rule_sweep.py --ops gdn kda --labels default --reps 10 --profile /tmp/gprof --json $OUT/ops_prof.json > $OUT/ops_prof.log 2>&1
echo "== ops rc=$?"; grep -vE "^\{" $OUT/ops_prof.log | grep -v "^  " | head -60
ls -la $OUT
