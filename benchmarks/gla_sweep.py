"""Sweep of the per-channel (GLA) Pallas Triton kernels' ChannelConfig, in one process on one GPU.

    PYTHONPATH=$PWD python3 benchmarks/gla_sweep.py --json gla_sweep.json
    JAX_PLATFORMS=cpu PYTHONPATH=$PWD python3 benchmarks/gla_sweep.py --interpret --json /tmp/gla_sweep.json

Times ``pallas_triton_channel.linear_attention(q, k, v, g=g, config=cfg)`` forward and forward+backward
(one jitted ``jax.vjp``: o and dq, dk, dv, dg) at one shape (default (B, T, H, D) = (1, 32768, 16, 128),
bf16 q/k/v/dO, float32 g: ``benchmarks/kernels.py``'s per-channel inputs) for the configs of
``CONFIGS`` (label, overrides of the shape's ``default_channel_config``), in order of interest: the
candidates of notes/kernels.md "Per-channel (GLA) kernels: register and spill report" first. Timing as
``benchmarks/delta_rule.py`` (median of ``--reps`` calls after 3 warm-ups, the first of which compiles).
A config that fails is recorded with its error. Each row is printed as it finishes and the JSON file is
rewritten after each row (a run cut short keeps what finished); a table sorted by forward+backward time
closes the run.

``--budget`` seconds in all: no config starts past it (the rows left are recorded as skipped).
``--check`` runs the fastest config on a small shape against the chunked XLA op (relative errors of o and
the four gradients). ``--interpret``: the Pallas interpreter on a tiny shape (CPU smoke run; the
interpreter ignores the launch parameters, so it checks that every config traces and runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.delta_rule import time_config  # noqa: E402
from benchmarks.kernels import _jax_inputs  # noqa: E402
from benchmarks.timing import forward_and_grads  # noqa: E402

SPLIT = {"split_grads": True, "recompute_dz": True}

# (label, ChannelConfig overrides), in order of interest; ptxas's registers and spills of each are in
# notes/kernels.md ("Per-channel (GLA) kernels: register and spill report")
CONFIGS = [
    ("default", {}),
    # session 14, not timed yet: the off-diagonal sub-tile pairs by whole-chunk (64-row) products
    ("stacked_pairs", {"stacked_pairs": True}),
    ("stacked_pairs,grads_warps=4", {"stacked_pairs": True, "num_warps_bwd": 4}),
    # the stacked score cotangent (7168 floats against 2560 pairwise) formed again in each step
    ("stacked_pairs,recompute_dz", {"stacked_pairs": True, "recompute_dz": True}),
    # the gradient kernel: 255 registers and ~1 KB of spills per thread at 8 warps, 32 columns
    ("split_grads,recompute_dz", SPLIT),
    ("recompute_dz", {"recompute_dz": True}),
    ("split_grads", {"split_grads": True}),
    ("split_grads,recompute_dz,block_cols=16", {**SPLIT, "block_cols": 16}),
    ("split_grads,recompute_dz,grads_warps=4", {**SPLIT, "num_warps_bwd": 4}),
    ("split_grads,recompute_dz,grads_stages=2", {**SPLIT, "num_stages_bwd": 2}),
    ("grads_warps=4", {"num_warps_bwd": 4}),
    # the output kernel: 255 registers at 8 warps (one program per SM); 179 at 16 columns
    ("block_cols=16", {"block_cols": 16}),
    ("output_warps=4", {"num_warps": 4}),
    ("block_cols=16,output_warps=4", {"block_cols": 16, "num_warps": 4}),
    ("block_cols=64", {"block_cols": 64}),
    # the state passes: 124 KB of shared memory at 3 stages (one program per SM); 72 KB at 2
    ("state_stages=2", {"num_stages_state": 2}),
    ("state_stages=1", {"num_stages_state": 1}),
    ("block_e=64", {"block_e": 64}),
    ("block_e=64,state_warps=8", {"block_e": 64, "num_warps_state": 8}),
    ("block_e=16", {"block_e": 16}),
    ("splits=4", {"splits": 4}),
    ("splits=16", {"splits": 16}),
    ("chunk=32", {"chunk": 32}),
    ("chunk=128", {"chunk": 128}),
    # combinations
    # session 18: on the factored diagonal tiles (session 17) 4 gradient warps and 64-column blocks each
    # gave 7.64 against 10.86 ms
    ("grads_warps=4,block_cols=64", {"num_warps_bwd": 4, "block_cols": 64}),
    ("grads_warps=4,output_warps=4", {"num_warps_bwd": 4, "num_warps": 4}),
    ("grads_warps=4,block_cols=64,output_warps=4", {"num_warps_bwd": 4, "block_cols": 64, "num_warps": 4}),
    ("grads_warps=4,state_stages=2", {"num_warps_bwd": 4, "num_stages_state": 2}),
    ("grads_warps=4,block_cols=128", {"num_warps_bwd": 4, "block_cols": 128}),
    ("grads_warps=4,output_warps=4,state_stages=2", {"num_warps_bwd": 4, "num_warps": 4, "num_stages_state": 2}),
    ("grads_warps=4,output_warps=4,grads_stages=2", {"num_warps_bwd": 4, "num_warps": 4, "num_stages_bwd": 2}),
    ("split_grads,recompute_dz,state_stages=2", {**SPLIT, "num_stages_state": 2}),
    ("split_grads,recompute_dz,block_cols=16,state_stages=2", {**SPLIT, "block_cols": 16, "num_stages_state": 2}),
    ("split_grads,recompute_dz,state_stages=2,block_e=64", {**SPLIT, "num_stages_state": 2, "block_e": 64}),
    # the state passes on gated keys / queries formed once in XLA (session 19; KDA's passes 2.2x faster):
    # cheaper steps, so fewer runs may now pay (the scalar gates' rule: one run of 16-wide blocks)
    ("pregated_state", {"pregated_state": True}),
    ("pregated_state=False", {"pregated_state": False}),  # the in-kernel form, since session 19 not bf16's default
    ("pregated_state,splits=1,block_e=16", {"pregated_state": True, "splits": 1, "block_e": 16}),
    ("pregated_state,splits=2", {"pregated_state": True, "splits": 2}),
    ("pregated_state,splits=2,block_e=16", {"pregated_state": True, "splits": 2, "block_e": 16}),
    ("pregated_state,state_stages=3", {"pregated_state": True, "num_stages_state": 3}),
    # the output kernel on 32-row sub-tiles where the gates allow them: bf16's default since session 24
    # (forward 1.90 / 1.67 -> 1.71 / 1.65 ms in two runs); this row is the 16-row form of before
    ("output_rows=None", {"output_rows": None}),
]

INTERPRET_SHAPE = (1, 64, 2, 32)
INTERPRET_CAPS = {"chunk": 32, "block_cols": 16, "block_e": 16, "splits": 4, "output_rows": 16}


def _fns(config, interpret):
    import jax

    from pallas_kernels.linear_attention import pallas_triton_channel

    def attn(q, k, v, g):
        return pallas_triton_channel.linear_attention(q, k, v, g=g, interpret=interpret, config=config)[0]

    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(functools.partial(forward_and_grads, attn))
    return attn, fwd, fwd_bwd


def base_config(shape, interpret: bool, dtype="bfloat16"):
    from pallas_kernels.linear_attention.config import default_channel_config

    b, t, h, d = shape
    base = default_channel_config(batch=b, heads=h, seq_len=t, value_dim=d, interpret=False, dtype=dtype, key_dim=d)
    if interpret:  # the GPU default's fields on a tiny shape: chunks and blocks the shape can hold
        rows = base.output_rows and 16  # one 16-row sub-tile per chunk
        base = dataclasses.replace(base, chunk=16, block_cols=16, block_e=16, splits=2, output_rows=rows)
    return base


def configs(base, interpret: bool, labels=None) -> list[tuple[str, object]]:
    """(label, config) of ``CONFIGS`` over ``base``; under ``--interpret`` the tiny shape's sizes are
    capped (chunk ≤ 32, blocks ≤ the head dim) and duplicates dropped."""
    out, seen = [], set()
    for label, over in CONFIGS:
        if labels and label not in labels:
            continue
        if interpret:
            capped = {k: min(v, INTERPRET_CAPS[k]) for k, v in over.items() if k in INTERPRET_CAPS and v is not None}
            over = over | capped
        cfg = dataclasses.replace(base, **over)
        if cfg not in seen:
            seen.add(cfg)
            out.append((label, cfg))
    return out


def check(shape, config, interpret, dtype="bfloat16") -> dict:
    """Relative errors of o and the gradients against the chunked XLA op (float32 copies of the inputs),
    for ``dtype`` q, k, v and dO (g float32)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import linear_attention

    (q, k, v, do), g = _jax_inputs(*shape, "channel")
    q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
    attn, _, fwd_bwd = _fns(config, interpret)

    def ref(q, k, v, g):
        return linear_attention(q, k, v, g=g, impl="xla")[0]

    o_ref, vjp_ref = jax.vjp(ref, *(x.astype(jnp.float32) for x in (q, k, v, g)))
    grads_ref = vjp_ref(do.astype(jnp.float32))
    o = jax.jit(attn)(q, k, v, g)  # the forward-only call
    o_vjp, grads = fwd_bwd(q, k, v, g, do)

    def rel(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))

    return {
        "o": rel(o, o_ref),
        "o_vjp": rel(o_vjp, o_ref),
        **{f"d{n}": rel(a, b) for n, a, b in zip("qkvg", grads, grads_ref, strict=True)},
    }


def save(path, shape, rows, checks=None):
    if path:
        with open(path, "w") as f:
            json.dump({"shape": list(shape), "rows": rows, "check": checks or {}}, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,32768,16,128", help="B,T,H,D")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds in all; later configs are skipped")
    ap.add_argument("--labels", nargs="+", default=None, help="only these configs (labels as printed)")
    ap.add_argument("--check", action="store_true", help="check the fastest config against the XLA op")
    ap.add_argument("--check-shape", default="1,512,4,128", help="B,T,H,D of --check")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter on a tiny shape (CPU smoke)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--gate-scale",
        type=float,
        default=1.0,
        help="multiply the log gates (about -0.05 per token; 200 gives about -10, past the diagonal tiles'"
        " factored form, so every tile takes the exact kernels)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="q, k, v, dO")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    shape = INTERPRET_SHAPE if args.interpret else tuple(map(int, args.shape.split(",")))
    reps = 1 if args.interpret else args.reps
    (q, k, v, do), g = _jax_inputs(*shape, "channel")
    q, k, v, do = (x.astype(args.dtype) for x in (q, k, v, do))
    g = g * args.gate_scale
    rows, start = [], time.perf_counter()
    for label, cfg in configs(base_config(shape, args.interpret, args.dtype), args.interpret, args.labels):
        row = {"shape": list(shape), "dtype": args.dtype, "label": label, "config": dataclasses.asdict(cfg)}
        if time.perf_counter() - start > args.budget:
            row["error"] = f"skipped: past the {args.budget} s budget"
        else:
            time_config(row, lambda cfg=cfg: _fns(cfg, args.interpret), (q, k, v, g), do, reps=reps)
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(args.json, shape, rows)

    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["fwd_bwd_ms"])
    base = next((r for r in ok if r["label"] == "default"), None)
    print(f"\nconfig | fwd ms | fwd+bwd ms   ({shape}, sorted by fwd+bwd)")
    for r in ok:
        speedup = f"  x{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f} vs default" if base else ""
        print(f"{r['label']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f}{speedup}")
    for r in rows:
        if "error" in r:
            print(f"{r['label']} | error: {r['error']}")
    checks = {}
    if args.check and ok:
        from pallas_kernels.linear_attention.config import ChannelConfig

        cshape = INTERPRET_SHAPE if args.interpret else tuple(map(int, args.check_shape.split(",")))
        cfg = ChannelConfig(**ok[0]["config"])
        try:
            checks = {"label": ok[0]["label"], **check(cshape, cfg, args.interpret, args.dtype)}
        except Exception as exc:  # noqa: BLE001
            checks = {"label": ok[0]["label"], "error": repr(exc)[:400]}
        print(f"check {cshape} rel err vs xla: {json.dumps(checks)}", flush=True)
    save(args.json, shape, rows, checks)


if __name__ == "__main__":
    main()
