#!/usr/bin/env bash
# Single-GPU measurements in one call (nvidia-h100-x1): the GPU tests, the kernels with 16 packed
# documents per row vs none beside flash-linear-attention (varlen), and the flash-attention block
# kernels beside cuDNN. Carry .whl (fla-core, see ../shared/bench/README.md) for the peer rows.
# Writes logs and JSON under $OUT (default runs/gpu). Uses the machine's python3 with PYTHONPATH=$PWD.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, jaxlib, triton, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__, 'torch', torch.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
timeout 300 python3 benchmarks/kernels.py --impls project fla --docs 0 16 --decay g_gamma --shapes 1,32768,16,128 4,8192,16,128 --json "$OUT/kernels_docs.json" > "$OUT/kernels_docs.log" 2>&1
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels tests/lasp_jax > "$OUT/gpu_tests.log" 2>&1
# the flash-attention kernels beside cuDNN (measured in session 2; add when re-tuning):
# timeout 100 python3 benchmarks/flash_attention.py --q-start 0 --k-tokens 32768 --json "$OUT/flash_causal.json"
cat "$OUT/env.txt"
for f in kernels_docs gpu_tests; do echo "== $f"; tail -n 30 "$OUT/$f.log"; done
