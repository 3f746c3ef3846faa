"""Sweep of the Pallas Triton gated-delta-rule kernels' BlockConfig, in one process on one GPU.

    python3 benchmarks/delta_rule_sweep.py --ops gdn kda --json sweep.json --check

For each op (GDN: one log gate per token; KDA: one per key channel) at one shape (default
(B, T, H, D) = (1, 32768, 16, 128), bf16; ``--dtype`` for fp16 or float32) it times the forward and
the forward+backward of
``pallas_triton.gated_delta_rule(..., config=cfg)`` for a list of configs: the shape's default
(``config.default_config``), each field moved alone from it, and a few combinations. Inputs and
timing as ``benchmarks/delta_rule.py`` (median of ``--reps`` calls after 3 warm-ups, the first of
which compiles). A config that fails is recorded with its error. Each row is printed as it
finishes, then a table sorted by forward+backward time; ``--json`` writes all rows.

``--budget`` seconds per op: no new config starts past it (the list is in order of interest).
``--check`` runs the best config of each op (by fwd+bwd) on a small shape and prints the relative
error of o and of the gradients of q, k, v, beta and g against the chunked XLA path; ``--check-all``
every config that ran.
``--base FIELD=VALUE ...`` starts from the default with those fields set (e.g. ``--base splits=1``).
``--interpret`` runs the kernels in the Pallas interpreter (CPU; a syntax check with a tiny shape).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.delta_rule import _jax_inputs, time_config  # noqa: E402
from benchmarks.timing import forward_and_grads  # noqa: E402


def variants(base, d: int, *, per_channel: bool = False) -> list[tuple[str, dict]]:
    """(label, overrides of ``base``): the default, one field at a time, then a few combinations
    (and, under per-channel gates, their sub-tile sizes last: measured slower in session 12)."""
    split = "splits"  # the state passes' parallel runs of chunks
    names = {f.name for f in dataclasses.fields(base)}
    one = [
        # the WY backward from the forward's stored X on whole chunks (the default under scalar / no
        # gates) against the 16-row one that forms X again
        {"store_inverse": not base.store_inverse},
        {"store_scores": not base.store_scores},  # the output backward reads the forward's scores
        {"inverse_precision": "highest" if base.inverse_precision != "highest" else "tf32x3"},
        # one tf32 product per float32 product of the inverse, on 16-row tiles or whole chunks
        {"inverse_precision": "tf32"},
        {"wy_rows": 64, "inverse_precision": "tf32"},
        {"wy_rows": 32, "inverse_precision": "tf32"},
        {"wy_rows": 64, "inverse_precision": "tf32x3"},  # whole-chunk WY kernels: the inverse by doubling
        {"wy_rows": 32, "inverse_precision": "tf32x3"},
        {"inverse_precision": "bf16"},  # the inverse's products on bf16 operands (session 24)
        {"num_warps_bwd": 4},
        {"num_warps_bwd": 8},  # per-channel gates default to 4
        {"block_cols": 64},
        {"block_cols": 16},
        {"block_cols": 64, "num_warps_bwd": 4},
        {"wy_rows": 64},  # whole-chunk WY kernels (scalar / no gates; per-channel gates ignore it)
        {"wy_rows": 32},
        {"wy_bwd_split": not base.wy_bwd_split},  # the two-kernel WY backward against the fused one
        {"block_cols": 64},
        {"block_cols": d},  # the whole row: no column loop
        {split: 1},
        {split: 2},
        {split: 4},
        {"block_e": 64},
        # narrower value blocks: twice the state passes' programs, each step half as wide
        {"block_e": 16},
        {"block_e": 32},  # the 32-wide blocks where the default picks 16
        {"block_e": 16, "num_warps_state": 2},
        {"num_warps_state": 8},
        {"num_stages_state": 2},
        {"num_warps_bwd": 4},
        {"num_stages_bwd": 2},
        {"num_warps": 4},
        {split: 16},
        # 128-token chunks: half the sequential steps of the state passes (each step's products twice
        # as tall), the WY inverse by two 64-row blocks or by doubling on the whole chunk
        {"chunk": 128},
        {"chunk": 128, "num_stages_state": 2},
        {"chunk": 128, "wy_rows": 128},
        {"chunk": 128, "block_e": 32},
        {"chunk": 32},
    ]
    combos = [
        {"store_scores": True, "num_warps_bwd": 4},
        {"wy_rows": 64, "block_cols": d},
        {"wy_rows": 64, "num_warps_bwd": 4},
        {"wy_rows": 64, "num_warps": 4},
        {"block_cols": d, "num_warps": 4},
        {"block_cols": 64, "num_warps_bwd": 4},
        {"block_cols": d, "num_stages_bwd": 2},
        {"block_e": 64, split: 4},
        {"block_cols": 64, "num_stages_bwd": 2},
        {"block_cols": d, "num_warps_bwd": 4, "num_stages_bwd": 2},
        {"block_e": 64, "num_warps_bwd": 4},
        # wider value blocks with the state passes split into runs (jax-linear-attention's forward
        # walks 4 pieces of 64-wide blocks: 128 programs, a quarter of the chain each)
        {"block_e": 32, split: 2},
        {"block_e": 32, split: 4},
        {"block_e": 64, split: 2},
        {"block_e": 64, split: 4, "num_warps_state": 8},
    ]
    # per-channel gates: sub-tiles of 32 rows or whole chunks (the diagonal tile by levels of
    # masked products), with the stored inverse, wider column blocks, the tf32 inverse (H200,
    # session 12: 94-212 ms against 26.9 with 16-row tiles)
    channel = [
        {"channel_rows": 32},
        {"channel_rows": 64},
        {"channel_rows": 32, "store_inverse": True},
        {"channel_rows": 64, "store_inverse": True},
        {"channel_rows": 64, "store_inverse": True, "inverse_precision": "tf32"},
        {"channel_rows": 64, "store_inverse": True, "block_cols": 64},
        {"channel_rows": 64, "store_inverse": True, "block_cols": 64, "inverse_precision": "tf32"},
        {"channel_rows": 64, "store_inverse": True, "block_cols": d, "inverse_precision": "tf32"},
        {"channel_rows": 64, "store_inverse": True, "num_warps_bwd": 8},
        # the forward's off-diagonal blocks by one whole-chunk product per key tile (ptxas: wgmma in
        # wy and output, wy's spills 36 → 8 B, output's 536 → 636 B)
        {"stacked_pairs": True},
        {"stacked_pairs": True, "num_warps_bwd": 8},  # ptxas: wy_bwd spills 5.8 KB at 4 warps, 2.7 at 8
        {"stacked_pairs": True, "block_cols": 64},
        # the state passes since sessions 12-13 (never re-swept for KDA): fewer runs with narrower
        # value blocks (one run: no transition or local reverse pass), wider blocks with more runs
        {split: 1, "block_e": 16},
        {split: 2, "block_e": 16},
        {split: 4, "block_e": 16},
        {split: 16, "block_e": 64},
        {split: 1, "block_e": 16, "num_warps_state": 2},
        # launch parameters again since the diagonal tiles became one product (session 17): fewer
        # live tiles in the backward chunk kernels than when 4 warps were chosen
        {"num_warps_output_bwd": 8},
        {"num_warps_bwd": 8, "num_warps_output_bwd": 4},
        {"num_warps": 4, "num_warps_bwd": 8},
        # the state passes on gated keys / queries formed once in XLA (session 19: the per-channel
        # default; False: the in-kernel form, which does not launch in float32 with 3 state stages)
        {"pregated_state": not base.pregated_state},
        {"pregated_state": not base.pregated_state, "num_stages_state": 2},
        # the chunk-local cumulative gates and dg by a Pallas kernel, not XLA's cumsum (session 21)
        {"cumsum_kernel": not base.cumsum_kernel},
        # 32-row sub-tiles where they were faster in session 22 (call E: wy_bwd 3.95 -> 3.40 ms, output
        # 1.01 -> 0.83 with channel_rows=32, which doubled wy), 16 elsewhere: the bf16 default since
        # session 23; these rows are the 16-row tiles of before, in one kernel or both, and the WY
        # backward on its 32-row tiles with 8 warps
        {"output_rows": None, "wy_bwd_rows": None},
        {"wy_bwd_rows": None},
        {"output_rows": None},
        {"num_warps_bwd": 8, "num_warps_output_bwd": 4},
        # the two near-ties of session 23's call D (9.64 and 9.63 against 9.70 ms), together
        {"inverse_precision": "tf32", "wy_bwd_split": True},
        # 32-row tiles in every kernel with the inverse's float32 products in tf32 (the float32 inverse
        # of 32-row diagonal blocks is what doubled wy in session 22's call E)
        {"channel_rows": 32, "inverse_precision": "tf32"},
        # the inverse's products on bf16 operands (session 24) with 32-row tiles everywhere
        {"channel_rows": 32, "inverse_precision": "bf16"},
    ]
    # scalar or no gates: the output written by the forward state pass (no output kernel)
    # (each value-block program forms Q Kᵀ ⊙ Γ again: wider blocks form it fewer times)
    scalar = [
        {"num_warps_output_bwd": 4},  # two output_bwd programs per SM (ptxas: 255 registers, 64 B spills)
        # the bf16 default's 4 warps checked against 8 (forward chunk kernels, output backward)
        {"num_warps": 8},
        {"num_warps_output_bwd": 8},
        {"num_warps_output_bwd": 4, "store_scores": True},
        # 32-column blocks in the WY kernels (ptxas: wy_bwd 12 B of spills against 76 with whole rows)
        {"block_cols": 32},
        {"num_warps_output_bwd": 4, "store_scores": True, "block_cols": 32},
        {"fuse_output": True},
        {"fuse_output": True, "num_warps": 4},  # the fused pass keeps num_warps_state; this is the WY kernel's
        {"fuse_output": True, "block_e": 32},
        {"fuse_output": True, "num_warps_state": 8},
    ]
    out, seen = [("default", {})], {dataclasses.astuple(base)}
    for over in one + combos + (channel if per_channel else scalar):
        over = {k: v for k, v in over.items() if k in names}
        try:
            cfg = dataclasses.replace(base, **over)
        except ValueError:
            continue
        key = dataclasses.astuple(cfg)
        if key not in seen:
            seen.add(key)
            out.append((",".join(f"{k}={v}" for k, v in over.items()), over))
    return out


def _fns(config, interpret):
    import jax

    from pallas_kernels.gated_delta_rule import pallas_triton

    def attn(q, k, v, beta, g):
        return pallas_triton.gated_delta_rule(q, k, v, beta, g=g, interpret=interpret, config=config)[0]

    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(functools.partial(forward_and_grads, attn))
    return attn, fwd, fwd_bwd


def sweep_op(
    op,
    shape,
    *,
    reps,
    budget,
    interpret,
    only=None,
    labels=None,
    base_overrides=None,
    profile_dir=None,
    gate_scale=1.0,
    dtype="bfloat16",
) -> list[dict]:
    from pallas_kernels.gated_delta_rule.config import default_config

    b, t, h, d = shape
    base = default_config(
        batch=b,
        value_heads=h,
        seq_len=t,
        value_dim=d,
        key_dim=d,
        per_channel=op == "kda",
        interpret=False,
        dtype=dtype,
    )
    base = dataclasses.replace(base, **(base_overrides or {}))
    q, k, v, beta, g, do = (x.astype(dtype) if x.dtype == "bfloat16" else x for x in _jax_inputs(op, *shape))
    g = g * gate_scale
    rows, start = [], time.perf_counter()
    todo = variants(base, d, per_channel=op == "kda")
    if labels:
        todo = [(label, over) for label, over in todo if label in labels]
    if only is not None:
        todo = todo[:only]
    for label, over in todo:
        if time.perf_counter() - start > budget:
            rows.append({"op": op, "label": label, "error": f"skipped: past the {budget} s budget"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        cfg = dataclasses.replace(base, **over)
        row = {"op": op, "shape": list(shape), "dtype": dtype, "label": label, "config": dataclasses.asdict(cfg)}
        if gate_scale != 1.0:
            row["gate_scale"] = gate_scale
        time_config(row, lambda cfg=cfg: _fns(cfg, interpret), (q, k, v, beta, g), do, reps=reps)
        if profile_dir and "error" not in row:
            from models.profile import profile_into

            logdir = os.path.join(profile_dir, f"{op}_{label}".replace("=", "-").replace(",", "_"))
            fwd_bwd = _fns(cfg, interpret)[2]
            run = lambda _, fn=fwd_bwd: fn(q, k, v, beta, g, do)  # noqa: E731
            profile_into(row, run, None, calls=3, logdir=logdir, title=f"{op} {label} {shape} fwd+bwd")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def check(op, shape, config, interpret, dtype="bfloat16") -> dict:
    """Relative errors of o and the gradients against the chunked XLA path (float32 inputs' copies)
    for ``dtype`` q, k, v, beta and dO (g float32)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import gated_delta_rule

    q, k, v, beta, g, do = (x.astype(dtype) if x.dtype == "bfloat16" else x for x in _jax_inputs(op, *shape))
    attn, _, fwd_bwd = _fns(config, interpret)

    def ref(q, k, v, beta, g):
        return gated_delta_rule(q, k, v, beta, g=g, impl="xla")[0]

    f32 = [x.astype(jnp.float32) for x in (q, k, v, beta, g)]
    o_ref, vjp_ref = jax.vjp(ref, *f32)
    grads_ref = vjp_ref(do.astype(jnp.float32))
    o = jax.jit(attn)(q, k, v, beta, g)  # the forward-only call (no residuals kept)
    o_vjp, grads = fwd_bwd(q, k, v, beta, g, do)

    def rel(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))

    out = {"o": rel(o, o_ref), "o_vjp": rel(o_vjp, o_ref)}
    out.update({f"d{n}": rel(a, b) for n, a, b in zip(("q", "k", "v", "beta", "g"), grads, grads_ref, strict=True)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=["gdn", "kda"], choices=["gdn", "kda"])
    ap.add_argument("--shape", default="1,32768,16,128", help="B,T,H,D")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=90.0, help="seconds per op; later configs are skipped")
    ap.add_argument("--only", type=int, default=None, help="the first N configs only")
    ap.add_argument("--labels", nargs="+", default=None, help="only these configs (labels as printed, e.g. splits=1)")
    ap.add_argument(
        "--base", nargs="+", default=[], metavar="FIELD=VALUE", help="start from the default with these fields"
    )
    ap.add_argument("--check", action="store_true", help="check the best configs against the XLA path")
    ap.add_argument("--check-all", action="store_true", help="check every config that ran, not only the best")
    ap.add_argument("--check-shape", default="1,512,4,128", help="B,T,H,D of --check")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU syntax check)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile", metavar="DIR", help="trace three fwd+bwd calls of each config, print device time by kernel"
    )
    ap.add_argument(
        "--gate-scale",
        type=float,
        default=1.0,
        help="multiply the log gates (KDA's are about -0.05 per token; 200 gives about -10, past the diagonal"
        " tiles' factored form, so every tile takes the exact fallback)",
    )
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="q, k, v, beta, dO (and the default)",
    )
    args = ap.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    shape = tuple(map(int, args.shape.split(",")))
    base_overrides = {}
    for item in args.base:
        field, _, value = item.partition("=")
        try:  # ints and bools as Python literals, anything else (e.g. tf32) as the string
            base_overrides[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            base_overrides[field] = value
    rows = []
    for op in args.ops:
        rows += sweep_op(
            op,
            shape,
            reps=args.reps,
            budget=args.budget,
            interpret=args.interpret,
            only=args.only,
            labels=args.labels,
            base_overrides=base_overrides,
            profile_dir=args.profile,
            gate_scale=args.gate_scale,
            dtype=args.dtype,
        )

    print(f"\nop | config | fwd ms | fwd+bwd ms   ({shape}, sorted by fwd+bwd)")
    checks = {}
    for op in args.ops:
        ok = sorted((r for r in rows if r["op"] == op and "error" not in r), key=lambda r: r["fwd_bwd_ms"])
        base = next((r for r in rows if r["op"] == op and r["label"] == "default" and "error" not in r), None)
        for r in ok:
            speedup = f"  x{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f} vs default" if base else ""
            print(f"{op} | {r['label']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f}{speedup}")
        for r in rows:
            if r["op"] == op and "error" in r:
                print(f"{op} | {r['label']} | error: {r['error']}")
        if ok:
            best_fwd = min(ok, key=lambda r: r["fwd_ms"])
            print(f"{op} best fwd: {best_fwd['label']} {best_fwd['fwd_ms']:.3f} ms; best fwd+bwd: {ok[0]['label']}")
        for r in ok if args.check_all else ok[:1] if args.check else []:
            from pallas_kernels.gated_delta_rule.config import BlockConfig

            cfg = BlockConfig(**r["config"])
            cshape = tuple(map(int, args.check_shape.split(",")))
            key = f"{op} {r['label']}"
            try:
                checks[key] = {"label": r["label"], **check(op, cshape, cfg, args.interpret, args.dtype)}
            except Exception as exc:  # noqa: BLE001
                checks[key] = {"label": r["label"], "error": repr(exc)[:400]}
            print(f"{op} check {cshape} rel err vs xla: {json.dumps(checks[key])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": list(shape), "rows": rows, "check": checks}, f, indent=1)


if __name__ == "__main__":
    main()
