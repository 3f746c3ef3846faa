"""Which tilings of the scalar-decay linear-attention kernels launch with wide heads.

Session 21 ran it at 256 (the 128 tiling, ``'{}'`` below, asked an H200 for 264,192 B of its
232,448 B of shared memory) and made the tiling it found, split dk / dv with 2 backward stages, the
default past 128; the compiled kernels refuse heads past 256 by default. This script tries
given ``BlockConfig`` overrides at a wide head on a GPU: the forward alone, then forward+backward,
printing one row per config (ok, or the bytes a failed launch asked for) with the largest relative
error, in float32, of the loss ``Σ o ⊙ cot`` and the gradients of q, k, v and the gates against the
XLA path, and writing them as JSON (after every row):

    python3 benchmarks/wide_heads_probe.py --dtype bfloat16 --d 256 \\
        '{}' '{"num_stages_bwd": 1}' '{"chunk": 32, "split_dkdv": true}' --json /tmp/wide.json

``--interpret`` runs the kernels in the Pallas interpreter (a CPU check of the script).
``--time B,T,H`` also times forward+backward at that shape (median ms, the XLA path on the same
inputs as the first row) for every config that passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import forward_and_grads, median_ms  # noqa: E402
from pallas_kernels.linear_attention import pallas_triton, xla  # noqa: E402
from pallas_kernels.linear_attention.config import BlockConfig  # noqa: E402


def inputs(b, t, h, d, dtype, decay):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(key, (b, t, h, d), jnp.float32) for key in keys[:3])
    q, k, v = (x.astype(dtype) for x in (q, k / d**0.5, v))
    gates = {}
    if decay == "g":
        gates["g"] = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h))) / 8
    elif decay == "g_gamma":
        gates["g_gamma"] = -jnp.linspace(0.01, 0.1, h)
    cot = jax.random.normal(keys[4], (b, t, h, d), jnp.float32)
    return (q, k, v), gates, cot


def grads_of(fn, cot):
    def loss(q, k, v, gates):
        return jnp.sum(fn(q, k, v, gates).astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def probe(overrides: dict, qkv, gates, cot, interpret: bool) -> dict:
    try:
        kernels = kernels_fn(overrides, interpret)
    except (TypeError, ValueError) as err:  # a bad config is a row too
        return {"config": overrides, "fwd": f"fails: {err}"}

    def reference(q, k, v, gates):
        return kernels_fn(None, interpret)(*(x.astype(jnp.float32) for x in (q, k, v)), gates)

    row = {"config": overrides}
    for what, call in (("fwd", jax.jit(lambda *a: kernels(*a))), ("fwd_bwd", grads_of(kernels, cot))):
        try:
            got = jax.block_until_ready(call(*qkv, gates))
            row[what] = "ok"
            if what == "fwd_bwd":
                with jax.default_matmul_precision("highest"):
                    want = grads_of(reference, cot)(*qkv, gates)
                pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
                pairs = [(jnp.asarray(a, jnp.float32), jnp.asarray(w, jnp.float32)) for a, w in pairs]
                errs = [float(jnp.linalg.norm(a - w) / (jnp.linalg.norm(w) + 1e-30)) for a, w in pairs]
                row["max_rel_err"] = max(errs)
        except Exception as err:  # noqa: BLE001 (a failed launch is a result here)
            asked = re.search(r"requested (\d+)", str(err))
            row[what] = f"fails: asked {asked.group(1)} B" if asked else f"fails: {str(err)[:160]}"
            break
    return row


def kernels_fn(overrides: dict | None, interpret: bool):
    """The compiled kernels with ``overrides`` (None: the XLA path) as ``fn(q, k, v, gates)``."""
    if overrides is None:
        return lambda q, k, v, gates: xla.linear_attention(
            q, k, v, gates.get("g"), scale=q.shape[-1] ** -0.5, gamma=gates.get("g_gamma")
        )[0]
    cfg = BlockConfig(**overrides)
    return lambda q, k, v, gates: pallas_triton.linear_attention(q, k, v, **gates, interpret=interpret, config=cfg)[0]


def time_fwd_bwd(overrides: dict | None, shape, dtype, decay, interpret: bool, reps: int) -> float:
    """Median ms of one forward+backward at ``shape`` (B, T, H, D)."""
    (q, k, v), gates, _ = inputs(*shape, dtype, decay)
    fn = kernels_fn(overrides, interpret)
    do = jnp.ones(v.shape, jax.eval_shape(fn, q, k, v, gates).dtype)
    step = jax.jit(lambda q, k, v, do: forward_and_grads(lambda q, k, v: fn(q, k, v, gates), q, k, v, do))
    return median_ms(step, q, k, v, do, reps=reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=["{}"], help="JSON BlockConfig overrides, one per config")
    ap.add_argument("--d", type=int, default=256, help="q/k and v head dim")
    ap.add_argument("--shape", default="1,1024,4", help="B,T,H")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--decay", default="g", choices=["none", "g", "g_gamma"])
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU check of the script)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--time", default=None, help="B,T,H: also time forward+backward there")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    b, t, h = (int(x) for x in args.shape.split(","))
    qkv, gates, cot = inputs(b, t, h, args.d, jnp.dtype(args.dtype), args.decay)
    rows = []
    timed = None if args.time is None else (*(int(x) for x in args.time.split(",")), args.d)
    if timed:
        ms = time_fwd_bwd(None, timed, jnp.dtype(args.dtype), args.decay, args.interpret, args.reps)
        rows.append(dict(config="xla", d=args.d, dtype=args.dtype, shape=timed, fwd_bwd_ms=round(ms, 3)))
        print(json.dumps(rows[-1]), flush=True)
    for spec in args.configs:
        overrides = json.loads(spec)
        row = dict(probe(overrides, qkv, gates, cot, args.interpret), d=args.d, dtype=args.dtype)
        if timed and row.get("fwd_bwd") == "ok":
            try:
                ms = time_fwd_bwd(overrides, timed, jnp.dtype(args.dtype), args.decay, args.interpret, args.reps)
                row.update(shape=timed, fwd_bwd_ms=round(ms, 3))
            except Exception as err:  # noqa: BLE001 (a larger shape may still fail)
                row.update(shape=timed, fwd_bwd_ms=f"fails: {str(err)[:160]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a time limit keeps what ran
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
