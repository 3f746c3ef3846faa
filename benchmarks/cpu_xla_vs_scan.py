"""The chunked XLA path against the token-scan oracle on the CPU (or any backend).

    python benchmarks/cpu_xla_vs_scan.py [--json out.json]

Prints forward and forward+backward medians (jit, float32, per-token g) and the speed-up.
"""

from __future__ import annotations

import argparse
import json

import jax

from benchmarks.timing import median_ms
from pallas_kernels import linear_attention

SHAPES = [(1, 4096, 4, 64), (1, 4096, 16, 128)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    for b, t, h, d in SHAPES:
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
        g = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h)))
        row = {"shape": [b, t, h, d], "backend": jax.default_backend(), "jax": jax.__version__}
        for impl in ("reference", "xla"):
            fwd = jax.jit(lambda q, k, v, g, impl=impl: linear_attention(q, k, v, g=g, impl=impl)[0])
            loss = lambda q, k, v, g, impl=impl: linear_attention(q, k, v, g=g, impl=impl)[0].sum()
            bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            row[f"{impl}_fwd_ms"] = median_ms(fwd, q, k, v, g, reps=3)
            row[f"{impl}_fwd_bwd_ms"] = median_ms(bwd, q, k, v, g, reps=3)
        rows.append(row)
    print(f"{'(B, T, H, D)':>20} {'scan fwd':>10} {'xla fwd':>10} {'x':>6} {'scan f+b':>10} {'xla f+b':>10} {'x':>6}")
    for r in rows:
        print(
            f"{str(tuple(r['shape'])):>20} {r['reference_fwd_ms']:10.1f} {r['xla_fwd_ms']:10.1f} "
            f"{r['reference_fwd_ms'] / r['xla_fwd_ms']:6.1f} {r['reference_fwd_bwd_ms']:10.1f} "
            f"{r['xla_fwd_bwd_ms']:10.1f} {r['reference_fwd_bwd_ms'] / r['xla_fwd_bwd_ms']:6.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
