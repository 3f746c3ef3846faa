#!/usr/bin/env bash
# session 10 call D (2xH200): issue 14. (1) runs per shard of the sharded delta rule's split kernels:
# the default config cuts each shard into 4 runs at gdn-1.3b's 32 value heads (two programs per SM);
# the single call measured 1 split faster than 4 at that shape (8.09 vs 10.77 ms): the op alone
# (ring, 32 heads, 1/2/4 runs). (2) gdn-1.3b sp 1/2 in one run with the short convolution's
# hand-written backward (no shard-sized pads, adds or zeroed copies around the borrowed inputs).
# (3) its sp=2 row with the op's fastest run count when that is not the default.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
TS=benchmarks/train_step.py
timeout 150 python3 benchmarks/delta_rule_sp.py --ops gdn --heads 32 --strategies ring --sp-splits 1 2 4 --no-peer --json "$OUT/splits_op.json" > "$OUT/splits_op.log" 2>&1
echo "== op, 32 heads"; grep -E "^\{" "$OUT/splits_op.log"
BEST=$(python3 - "$OUT/splits_op.json" <<'PY'
import json, sys
try:
    rows = [r for r in json.load(open(sys.argv[1])) if "splits" in r["what"] and "fwd_bwd_ms" in r]
except Exception:
    rows = []
print(min(rows, key=lambda r: r["fwd_bwd_ms"])["what"].split(", ")[1].split()[0] if rows else 4)
PY
)
echo "== fastest: $BEST runs per shard"
timeout 230 python3 $TS --preset gdn-1.3b --remat none --sp 1 2 --json "$OUT/gdn_sp.json" > "$OUT/gdn_sp.log" 2>&1
echo "== gdn sp 1/2, default runs"; grep -E "row:|Error" "$OUT/gdn_sp.log" | tail -n 3
if [ "$BEST" != 4 ]; then
  timeout 140 python3 $TS --preset gdn-1.3b --remat none --sp 2 --iters 6 --delta-sp-splits "$BEST" --json "$OUT/gdn_sp2_best.json" > "$OUT/gdn_sp2_best.log" 2>&1
  echo "== gdn sp2, $BEST runs"; grep -E "row:|Error" "$OUT/gdn_sp2_best.log" | tail -n 2
fi
cd "$OUT" && tar czf logs.tgz *.log *.json && rm -f *.log *.json
