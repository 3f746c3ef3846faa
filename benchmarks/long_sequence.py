#!/usr/bin/env python3
"""One call of a million tokens through the Pallas kernels, forward and backward, on one GPU.

Runs T = 1,048,576 (B=1, H=4, D=128, bf16, constant per-head decay) forward+backward in one
call and checks that nothing is NaN/inf and that the result equals two chained halves
(``[0, T/2)`` then ``[T/2, T)`` with the first half's final state as the second's initial
state): outputs, final state and the gradients of q, k, v and initial_state. Prints a table
and writes JSON with ``--json``:

    PYTHONPATH=$PWD python3 benchmarks/long_sequence.py --json long.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from pallas_kernels import linear_attention


@jax.jit
def _rel_err(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30), jnp.all(jnp.isfinite(a) & jnp.isfinite(b))


def rel_err(a, b) -> tuple[float, bool]:
    """(‖a − b‖ / ‖b‖, both finite), on the device: the arrays hold a billion elements."""
    err, finite = _rel_err(a, b)
    return float(err), bool(finite)


def make_inputs(b, t, h, d, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k, v, do = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in keys[:4])
    k = (k.astype(jnp.float32) * d**-0.5).astype(jnp.bfloat16)
    s0 = jax.random.normal(keys[4], (b, h, d, d), jnp.float32) * d**-0.5
    ds = jax.random.normal(keys[5], (b, h, d, d), jnp.float32)
    g_gamma = -jnp.linspace(1e-3, 0.1, h, dtype=jnp.float32)
    return q, k, v, do, s0, ds, g_gamma


def whole_and_halves(q, k, v, do, s0, ds, g_gamma, impl="pallas"):
    """(o, final, grads) of <o, do> + <final, ds> for the whole sequence and two chained halves."""

    def run(q, k, v, s0):
        return linear_attention(q, k, v, g_gamma=g_gamma, initial_state=s0, output_final_state=True, impl=impl)

    def chained(q, k, v, s0):
        half = q.shape[1] // 2
        first, second = slice(0, half), slice(half, None)
        o1, s1 = run(q[:, first], k[:, first], v[:, first], s0)
        o2, s2 = run(q[:, second], k[:, second], v[:, second], s1)
        return jnp.concatenate([o1, o2], axis=1), s2

    def with_grads(fn):
        def loss(q, k, v, s0):
            o, s = fn(q, k, v, s0)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(s * ds), (o, s)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))

    return with_grads(run)(q, k, v, s0), with_grads(chained)(q, k, v, s0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1 << 20)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    inputs = make_inputs(1, args.seq_len, args.heads, args.dim)
    print(f"running T={args.seq_len} whole and as two chained halves (compiles first)", flush=True)
    start = time.perf_counter()
    (grads_w, (o_w, s_w)), (grads_c, (o_c, s_c)) = jax.block_until_ready(whole_and_halves(*inputs))
    seconds = time.perf_counter() - start
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    whole = [o_w, s_w, *grads_w]
    chain = [o_c, s_c, *grads_c]
    report = {"shape": [1, args.seq_len, args.heads, args.dim], "dtype": "bfloat16", "first_call_s": seconds}
    print(f"B=1 T={args.seq_len} H={args.heads} D={args.dim} bf16, g_gamma; whole vs two chained halves")
    for name, a, b in zip(names, whole, chain):
        err, finite = rel_err(a, b)
        report[name] = {"finite": finite, "rel_err": err}
        print(f"{name:16s} finite={finite}  rel_err={err:.2e}")
    ok = all(r["finite"] and r["rel_err"] < 1e-2 for r in (report[n] for n in names))
    report["ok"] = ok
    print("OK" if ok else "MISMATCH")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
