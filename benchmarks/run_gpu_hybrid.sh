#!/usr/bin/env bash
# The softmax layer (allgather and ring, balanced and contiguous) and the hybrid TNL train step (both)
# under sp = every local GPU, against one GPU. Writes logs and JSON under $OUT. ~3 minutes on 2 or 4 H200s.
set -u
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
N=$(nvidia-smi -L | wc -l)
timeout 150 python3 benchmarks/hybrid.py --sp $N --reps 3 --strategies allgather allgather_contiguous ring ring_contiguous --json $OUT/hybrid_layer.json > $OUT/hybrid_layer.log 2>&1
timeout 250 python3 benchmarks/hybrid.py --workload tnl-hybrid --sp $N --strategies allgather ring --json $OUT/hybrid_model.json > $OUT/hybrid_model.log 2>&1
tail -7 $OUT/hybrid_layer.log; tail -5 $OUT/hybrid_model.log
python3 -c "
import json,sys
for f in ('hybrid_layer','hybrid_model'):
    try: d=json.load(open('$OUT/'+f+'.json'))
    except Exception as e: print(f, e); continue
    for r in d['rows']: print(f, r.get('sp'), r.get('strategy'), r.get('ms'), 'maxdiff', r.get('max_abs_diff_vs_single'))
"
