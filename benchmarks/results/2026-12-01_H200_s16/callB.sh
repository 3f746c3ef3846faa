#!/usr/bin/env bash
# session 16, call B (1xH200): the flash kernels' document bounds by unrolled binary search (new)
# against jnp's default while-loop search (old, set back by sed in this copy only): each rank's block
# compute at sp=2 with 8K-token documents (cudnn_blocks and pallas), and the single-call kernels on
# causal 32K with 16 documents
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
mkdir -p $OUT
for variant in new old; do
  if [ $variant = old ]; then sed -i 's/^SEARCH = "scan_unrolled"/SEARCH = "scan"/' pallas_kernels/flash_attention/common.py; fi
  grep -n '^SEARCH' pallas_kernels/flash_attention/common.py
  prof=""; if [ $variant = new ]; then prof="--profile /tmp/prof_b"; fi
  timeout 150 python3 benchmarks/softmax_rank_work.py --sp 2 --doc-len 8192 --impls cudnn_blocks pallas --reps 5 $prof --json $OUT/rank_work_docs8192_$variant.json > $OUT/rank_work_docs8192_$variant.log 2>&1
  echo "== rank work docs 8192 $variant rc=$?"; grep -v Warning $OUT/rank_work_docs8192_$variant.log | grep -E "rank|slowest|idle|device time|MemcpyD2D|cond" | cut -c1-160 | head -n 24
  timeout 120 python3 benchmarks/flash_attention.py --q-start 0 --k-tokens 32768 --fwd 128,128,8,3 --bwd 64,64,64,64,4,2 --docs 16 --json $OUT/flash_docs16_$variant.json > $OUT/flash_docs16_$variant.log 2>&1
  echo "== flash docs16 $variant rc=$?"; grep -v Warning $OUT/flash_docs16_$variant.log | tail -n 6 | cut -c1-200
done
sed -i 's/^SEARCH = "scan"/SEARCH = "scan_unrolled"/' pallas_kernels/flash_attention/common.py
