"""The chunked XLA path against the token-scan oracle on the CPU (or any backend).

    python benchmarks/cpu_xla_vs_scan.py [--ops linear gdn kda deltanet] [--json out.json]

Prints forward and forward+backward medians (jit, float32) and the speed-up, per op:
``linear`` is ``linear_attention`` with per-token g; ``gdn`` / ``kda`` / ``deltanet`` are
``gated_delta_rule`` with per-head gates, per-channel gates (``logsigmoid(x) / 16``) and none, on
unit-norm q and k.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.timing import median_ms
from pallas_kernels import gated_delta_rule, linear_attention

SHAPES = {
    "linear": [(1, 4096, 4, 64), (1, 4096, 16, 128)],
    "gdn": [(1, 2048, 4, 64), (1, 4096, 4, 64)],
    "kda": [(1, 2048, 4, 64)],
    "deltanet": [(1, 2048, 4, 64)],
}


def _inputs(op, shape):
    """``(op_fn(impl), args)``: the op on ``args`` with the gradient taken in all of them."""
    b, t, h, d = shape
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
    if op == "linear":
        g = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h)))
        return (lambda impl: lambda q, k, v, g: linear_attention(q, k, v, g=g, impl=impl)[0]), (q, k, v, g)
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, h)))
    if op == "deltanet":
        return (lambda impl: lambda q, k, v, beta: gated_delta_rule(q, k, v, beta, impl=impl)[0]), (q, k, v, beta)
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, t, h, d) if op == "kda" else (b, t, h)))
    g = g / 16 if op == "kda" else g
    return (lambda impl: lambda q, k, v, beta, g: gated_delta_rule(q, k, v, beta, g=g, impl=impl)[0]), (
        q,
        k,
        v,
        beta,
        g,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    heads = ("op", "(B, T, H, D)", "scan fwd", "xla fwd", "x", "scan f+b", "xla f+b", "x")
    print(" ".join(f"{name:>{w}}" for name, w in zip(heads, (8, 20, 10, 10, 6, 10, 10, 6), strict=True)))
    for op in args.ops:
        for shape in SHAPES[op]:
            make, inputs = _inputs(op, shape)
            row = {"op": op, "shape": list(shape), "backend": jax.default_backend(), "jax": jax.__version__}
            for impl in ("reference", "xla"):
                fn = make(impl)
                grads = jax.jit(jax.grad(lambda *a, fn=fn: fn(*a).sum(), argnums=tuple(range(len(inputs)))))
                row[f"{impl}_fwd_ms"] = median_ms(jax.jit(fn), *inputs, reps=3)
                row[f"{impl}_fwd_bwd_ms"] = median_ms(grads, *inputs, reps=3)
            rows.append(row)
            times = [row[f"{impl}_{pass_}_ms"] for pass_ in ("fwd", "fwd_bwd") for impl in ("reference", "xla")]
            scan_fwd, xla_fwd, scan_fb, xla_fb = times
            print(
                f"{op:>8} {str(tuple(shape)):>20} {scan_fwd:10.1f} {xla_fwd:10.1f} {scan_fwd / xla_fwd:6.1f} "
                f"{scan_fb:10.1f} {xla_fb:10.1f} {scan_fb / xla_fb:6.1f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
