#!/usr/bin/env bash
# session 8 call B (2xH200): gdn-1.3b step profile (issue 14) beside kda-1.3b remat none, then the
# delta rule under sp=2 with jax-linear-attention's context-parallel peer (issue 13)
set -u
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
( cd "$ROOT"; PYTHONPATH=$ROOT CUDA_VISIBLE_DEVICES=0 timeout 230 python3 benchmarks/train_step.py --preset gdn-1.3b --remat none --profile "$OUT/prof_gdn" --json "$OUT/gdn13b_prof.json" > "$OUT/gdn13b_prof.log" 2>&1 ) &
( cd "$ROOT"; PYTHONPATH=$ROOT CUDA_VISIBLE_DEVICES=1 timeout 260 python3 benchmarks/train_step.py --preset kda-1.3b --remat none --json "$OUT/kda13b.json" > "$OUT/kda13b.log" 2>&1 ) &
wait
echo "== gdn13b profile"; grep -vE "^\s*$" "$OUT/gdn13b_prof.log" | tail -n 45
echo "== kda13b"; grep -E "row:|Error|error" "$OUT/kda13b.log" | tail -n 3
PYTHONPATH=/tmp/site:$ROOT timeout 280 python3 benchmarks/delta_rule_sp.py --ops gdn kda --json "$OUT/delta_sp.json" > "$OUT/delta_sp.log" 2>&1
echo "== delta sp"; grep -E "^\{|not importable" "$OUT/delta_sp.log"
rm -rf "$OUT/prof_gdn"
