#!/usr/bin/env python3
"""Single-GPU causal flash attention: the Pallas Triton block kernels, their tilings, and cuDNN.

Times (median of --reps after a warm-up) the forward and the backward of
``pallas_kernels.flash_attention`` at one block shape: ``--q-tokens`` queries at global position
``--q-start`` against ``--k-tokens`` keys from position 0. The default is what LASP-2H's last rank
computes at sp=2 with 32K tokens per GPU (32K queries at 32768 against 64K gathered keys,
H32 Hk8 D128 bf16); ``--q-start 0 --k-tokens 32768`` is one GPU's plain causal attention, where
cuDNN (``jax.nn.dot_product_attention(is_causal=True)``) runs beside it for reference.

Every ``--fwd`` and ``--bwd`` tiling given is timed (forward tilings for the forward, backward
tilings for the backward given the forward's o and lse), so the defaults in
``pallas_kernels/flash_attention/config.py`` can be picked from one run:

    PYTHONPATH=$PWD python3 benchmarks/flash_attention.py --json flash.json
    PYTHONPATH=$PWD python3 benchmarks/flash_attention.py --q-start 0 --k-tokens 32768      # with cuDNN
    PYTHONPATH=$PWD python3 benchmarks/flash_attention.py --fwd 128,64,8,3 128,128,8,2 --bwd 64,64,64,64,8,2
    PYTHONPATH=$PWD python3 benchmarks/flash_attention.py --fwd --backward fused --bwd 64,64,64,64,4,2 128,64,64,128,8,2

Forward tiling ``block_q,block_k,num_warps,num_stages``; backward ``block_q_dq,block_k_dq,
block_k_dkv,block_q_dkv,num_warps_bwd,num_stages_bwd``; each backward tiling runs with every ``--backward``
variant (``BlockConfig.backward``: ``split``, a dq and a dk/dv kernel that both recompute Q Kᵀ and
dO Vᵀ, seven tile products; ``fused``, the dk/dv kernel adding dq with float32 atomics, five; the
fused variant ignores the dq tiles). Every backward row reports its largest difference from the
default configuration's split backward (dq, dk, dv), so a variant that computes something else
shows. TFLOP/s count the visible (causal) pairs only: forward ``4·D`` per pair and head, backward
``10·D`` (the five products of FlashAttention-2, whichever variant runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_ms  # noqa: E402
from pallas_kernels.common import pad_dim  # noqa: E402
from pallas_kernels.flash_attention import (  # noqa: E402
    BlockConfig,
    block_attention_bwd,
    block_attention_fwd,
    default_config,
)
from pallas_kernels.flash_attention.config import BACKWARDS  # noqa: E402

FWD_TILINGS = ["128,64,8,3", "128,64,4,3", "128,128,8,2", "128,128,8,3", "64,64,4,3", "64,128,4,2", "128,32,4,3"]
BWD_TILINGS = [
    "64,64,64,64,8,2",
    "64,64,64,64,4,2",
    "128,32,32,128,4,2",
    "128,64,64,128,8,2",
    "64,64,64,64,8,3",
    "32,64,64,32,4,3",
    "128,128,128,128,8,1",
]


def visible_pairs(lq: int, lk: int, q_start: int) -> int:
    pos = q_start + np.arange(lq)
    return int(np.clip(pos + 1, 0, lk).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-tokens", type=int, default=32768)
    parser.add_argument("--k-tokens", type=int, default=65536)
    parser.add_argument("--q-start", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--fwd", nargs="*", default=FWD_TILINGS)
    parser.add_argument("--bwd", nargs="*", default=BWD_TILINGS)
    parser.add_argument(
        "--backward", nargs="+", default=list(BACKWARDS), choices=BACKWARDS, help="backward variants to time"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--docs", type=int, default=0, help="pack this many documents (random cuts over the keys' span) per row"
    )
    parser.add_argument("--no-skip", action="store_true", help="with --docs: masks only, no document block skipping")
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    b, lq, lk, h, hk, d = args.batch, args.q_tokens, args.k_tokens, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, lq, h, d), dtype)
    k = jax.random.normal(keys[1], (b, lk, hk, d), dtype)
    v = jax.random.normal(keys[2], (b, lk, hk, d), dtype)
    do = jax.random.normal(keys[3], (b, lq, h, d), dtype)
    pos = dict(q_start=jnp.int32(args.q_start), k_start=jnp.int32(0), scale=d**-0.5)
    if args.docs > 1:  # document numbers over the global span [0, max(lk, q_start + lq)), as softmax_attention passes
        total = max(lk, args.q_start + lq)
        cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, total), args.docs - 1, replace=False))
        ids = jnp.asarray(np.broadcast_to(np.searchsorted(cuts, np.arange(total), side="right"), (b, total)), jnp.int32)
        pos |= dict(q_segment_ids=ids[:, args.q_start : args.q_start + lq], k_segment_ids=ids[:, :lk])
        pos["documents_sorted"] = not args.no_skip
    pairs = b * h * visible_pairs(lq, lk, args.q_start)  # nominal (causal) pairs: TFLOP/s ignore documents
    fwd_flop, bwd_flop = 4 * d * pairs, 10 * d * pairs
    devices = jax.devices()
    print(f"jax {jax.__version__}, {devices[0].device_kind}; q {q.shape} at {args.q_start}, k {k.shape}, {dtype}")
    print(f"default config: {default_config(head_dim=pad_dim(d), interpret=False, dtype=dtype)}")

    rows = []
    base = default_config(head_dim=pad_dim(d), interpret=False, dtype=dtype)
    o_ref, lse_ref = jax.jit(lambda q, k, v: block_attention_fwd(q, k, v, **pos, config=base))(q, k, v)
    o_ref = o_ref.astype(dtype)
    grads_ref = jax.jit(lambda *a: block_attention_bwd(*a, **pos, config=base))(q, k, v, o_ref, lse_ref, do)
    for spec in args.fwd:
        bq, bk, warps, stages = map(int, spec.split(","))
        row = {"pass": "fwd", "tiling": spec}
        try:
            cfg = dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
            fn = jax.jit(lambda q, k, v, cfg=cfg: block_attention_fwd(q, k, v, **pos, config=cfg))
            row["ms"] = median_ms(fn, q, k, v, reps=args.reps)
            row["tflops"] = fwd_flop / row["ms"] / 1e9
            row["max_abs_diff"] = float(jnp.abs(fn(q, k, v)[0].astype(dtype) - o_ref).max())
        except Exception as err:  # noqa: BLE001 (a tiling that does not fit is a result)
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
    for spec, backward in [(spec, backward) for backward in args.backward for spec in args.bwd]:
        bq_dq, bk_dq, bk_dkv, bq_dkv, warps, stages = map(int, spec.split(","))
        row = {"pass": "bwd", "tiling": f"{backward} {spec}"}
        try:
            cfg = BlockConfig(
                block_q=base.block_q,
                block_k=base.block_k,
                block_q_dq=bq_dq,
                block_k_dq=bk_dq,
                block_k_dkv=bk_dkv,
                block_q_dkv=bq_dkv,
                num_warps=base.num_warps,
                num_stages=base.num_stages,
                num_warps_bwd=warps,
                num_stages_bwd=stages,
                backward=backward,
            )
            fn = jax.jit(lambda *a, cfg=cfg: block_attention_bwd(*a, **pos, config=cfg))
            row["ms"] = median_ms(fn, q, k, v, o_ref, lse_ref, do, reps=args.reps)
            row["tflops"] = bwd_flop / row["ms"] / 1e9
            grads = fn(q, k, v, o_ref, lse_ref, do)
            row["max_abs_diff"] = max(float(jnp.abs(x - y).max()) for x, y in zip(grads, grads_ref, strict=True))
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
    if args.q_start == 0 and lq == lk and args.docs <= 1:  # plain causal attention: cuDNN beside the kernels
        for name, impl in (("cudnn", "cudnn"), ("xla-dpa", "xla")):
            row = {"pass": "fwd", "tiling": name}
            try:
                attn = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(  # noqa: E731
                    q, k, v, is_causal=True, implementation=impl
                )
                row["ms"] = median_ms(jax.jit(attn), q, k, v, reps=args.reps)
                row["tflops"] = fwd_flop / row["ms"] / 1e9
                fwd_bwd = jax.jit(lambda q, k, v, do, attn=attn: jax.vjp(attn, q, k, v)[1](do))
                both = median_ms(fwd_bwd, q, k, v, do, reps=args.reps)
                rows.append(row)
                row = {"pass": "bwd", "tiling": name, "ms": both - row["ms"]}
                row["tflops"] = bwd_flop / row["ms"] / 1e9
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)

    print(f"\n{'pass':>4} {'tiling':>24} {'ms':>9} {'TFLOP/s':>8} {'max |diff|':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['pass']:>4} {r['tiling']:>24} {'—':>9}  {r['error']}")
        else:
            diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "—"
            print(f"{r['pass']:>4} {r['tiling']:>24} {r['ms']:9.2f} {r['tflops']:8.1f} {diff:>11}")
    if args.json:
        meta = {"jax": jax.__version__, "device": devices[0].device_kind, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump(meta | {"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
