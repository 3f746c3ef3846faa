"""Each rank's block work in the balanced allgather softmax layer, timed on one GPU.

    python benchmarks/softmax_rank_work.py --sp 2 4 --json out.json
    python benchmarks/softmax_rank_work.py --smoke        # CPU, tiny shapes

Under ``softmax_attention(strategy="allgather")`` with causal balancing, rank r of P computes the
queries of half-shards ("chunks") r and 2P − 1 − r against the gathered K/V: forward (o, lse) per
chunk, then the backward given them. This script runs exactly those block calls for every rank on
one device, with the chunk's global offset traced as under ``shard_map``, so the block compute of
an sp = P step is measured without P GPUs and without its collectives (the all-gather of K/V and the
reduce-scatter of dK/dV, ~3 ms exposed at sp = 2 in session 11's profile). The slowest rank over
one GPU's cuDNN fwd+bwd on the whole sequence is the layer's ratio before communication (ideal 1/P).
Rows per block compute: ``pallas`` (the Pallas Triton kernels) and ``cudnn_blocks`` (cuDNN's fused
kernels, a prefix call and a causal band per chunk). With ``--pairs`` also the same rank's work as the
zig-zag ring and balanced TokenRing cut it: one block call per visible (query chunk, key chunk) pair,
merged by the online softmax (their steps' compute without the ring's overlap or waits).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import forward_and_grads, median_ms  # noqa: E402
from lasp_jax.softmax.deal import merge  # noqa: E402
from pallas_kernels.flash_attention import block_functions  # noqa: E402


def rank_step(impl: str, scale: float):
    """fwd+bwd of one rank's chunks: ``(q_chunks, starts, k, v, do_chunks, q_ids, k_ids) -> (o_chunks,
    dq, dk, dv)``; ``q_ids`` (per chunk) and ``k_ids``: document numbers, or None."""
    fwd, bwd = block_functions(impl, documents_sorted=True)

    def step(qs, starts, k, v, dos, q_ids, k_ids):
        outs, dqs, dk, dv = [], [], 0.0, 0.0
        for i, (q, do) in enumerate(zip(qs, dos, strict=True)):
            ids = {} if k_ids is None else dict(q_segment_ids=q_ids[i], k_segment_ids=k_ids)
            kw = dict(q_start=starts[i], k_start=0, scale=scale, **ids)
            o, lse = fwd(q, k, v, **kw)
            o = o.astype(q.dtype)
            dq, dk_i, dv_i = bwd(q, k, v, o, lse, do, **kw)
            outs.append(o)
            dqs.append(dq.astype(q.dtype))
            dk, dv = dk + dk_i, dv + dv_i
        return outs, dqs, dk.astype(k.dtype), dv.astype(v.dtype)

    return jax.jit(step)


def rank_pairs_step(impl: str, scale: float, chunk: int):
    """The same rank's work as one call per visible (query chunk, key chunk) pair: ``(q_chunks,
    chunk_ids, k_chunks, v_chunks, do_chunks) -> (o_chunks, dq, dk, dv)`` (chunk ids static)."""
    fwd, bwd = block_functions(impl, documents_sorted=True)

    def step(qs, ids, ks, vs, dos):
        outs, dqs = [], []
        dks, dvs = [0.0] * len(ks), [0.0] * len(vs)
        for q, c, do in zip(qs, ids, dos, strict=True):
            kws = [dict(q_start=jnp.int32(c * chunk), k_start=jnp.int32(j * chunk), scale=scale) for j in range(c + 1)]
            o, lse = fwd(q, ks[0], vs[0], **kws[0])
            for j in range(1, c + 1):
                o_j, lse_j = fwd(q, ks[j], vs[j], **kws[j])
                o, lse = merge(o, lse, o_j, lse_j)
            o = o.astype(q.dtype)
            dq = 0.0
            for j in range(c + 1):
                dq_j, dk_j, dv_j = bwd(q, ks[j], vs[j], o, lse, do, **kws[j])
                dq, dks[j], dvs[j] = dq + dq_j, dks[j] + dk_j, dvs[j] + dv_j
            outs.append(o)
            dqs.append(dq.astype(q.dtype))
        return outs, dqs, dks, dvs

    return jax.jit(step, static_argnums=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens-per-device", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--impls", nargs="+", default=["cudnn_blocks", "pallas"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pairs", action="store_true", help="also one call per chunk pair (the rings' cut)")
    ap.add_argument("--doc-len", type=int, default=0, help="packed documents of this many tokens (0: none)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR", help="trace rank 0's step per impl, print device time")
    args = ap.parse_args()
    if args.smoke:
        args.tokens_per_device, args.heads, args.kv_heads, args.head_dim, args.reps = 64, 4, 2, 16, 1
        args.impls = ["cudnn_blocks", "xla"]
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    h, hk, d = args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, H{h} Hk{hk} D{d} {jnp.dtype(dtype).name}")
    rows, profiles = [], {}
    for p in args.sp:
        t = p * args.tokens_per_device
        chunk = t // (2 * p)
        keys = jax.random.split(jax.random.key(p), 4)
        q = jax.random.normal(keys[0], (1, t, h, d), dtype)
        k = jax.random.normal(keys[1], (1, t, hk, d), dtype)
        v = jax.random.normal(keys[2], (1, t, hk, d), dtype)
        do = jax.random.normal(keys[3], (1, t, h, d), dtype)
        one = jax.jit(
            functools.partial(
                forward_and_grads,
                functools.partial(
                    jax.nn.dot_product_attention,
                    is_causal=True,
                    scale=scale,
                    implementation=None if args.smoke else "cudnn",
                ),
            )
        )
        base = median_ms(one, q, k, v, do, reps=args.reps)
        rows.append({"sp": p, "what": "one device, whole sequence (jax.nn.dot_product_attention)", "ms": base})
        print(f"sp={p} T={t}: one device, whole sequence {base:.2f} ms", flush=True)
        for impl in args.impls:
            step = rank_step(impl, scale)
            times = []
            for r in range(p):
                cs = (r, 2 * p - 1 - r)
                qs = [q[:, c * chunk : (c + 1) * chunk] for c in cs]
                dos = [do[:, c * chunk : (c + 1) * chunk] for c in cs]
                starts = [jnp.int32(c * chunk) for c in cs]
                ids = (None, None)
                if args.doc_len:  # global document numbers, sorted: what softmax_attention passes
                    doc = (jnp.arange(t, dtype=jnp.int32) // args.doc_len)[None]
                    ids = ([doc[:, c * chunk : (c + 1) * chunk] for c in cs], doc)
                times.append(median_ms(step, qs, starts, k, v, dos, *ids, reps=args.reps))
                print(f"  {impl} rank {r} (chunks {cs}): {times[-1]:.2f} ms", flush=True)
                if args.profile and r == 0:
                    from models.profile import format_table, profile_calls

                    run = lambda _, f=step, a=(qs, starts, k, v, dos, *ids): f(*a)  # noqa: E731
                    _, summary = profile_calls(run, None, calls=3, logdir=os.path.join(args.profile, f"{impl}_sp{p}"))
                    print(format_table(summary, title=f"{impl} sp={p} rank 0 fwd+bwd"), flush=True)
                    profiles[f"{impl} sp={p}"] = summary.as_json()
            row = {
                "sp": p,
                "what": impl + (f", documents of {args.doc_len}" if args.doc_len else ""),
                "rank_ms": times,
                "ms": max(times),
                "x_one_device": max(times) / base,
            }
            rows.append(row)
            print(f"  {impl}: slowest rank {max(times):.2f} ms = {max(times) / base:.3f} x one device", flush=True)
            if not args.pairs or args.doc_len:
                continue
            step = rank_pairs_step(impl, scale, chunk)
            ks = [k[:, j * chunk : (j + 1) * chunk] for j in range(2 * p)]
            vs = [v[:, j * chunk : (j + 1) * chunk] for j in range(2 * p)]
            times = []
            for r in range(p):
                cs = (r, 2 * p - 1 - r)
                qs = [q[:, c * chunk : (c + 1) * chunk] for c in cs]
                dos = [do[:, c * chunk : (c + 1) * chunk] for c in cs]
                times.append(median_ms(step, qs, cs, ks, vs, dos, reps=args.reps))
                print(f"  {impl} per chunk pair, rank {r}: {times[-1]:.2f} ms", flush=True)
            what = f"{impl} per chunk pair"
            rows.append({"sp": p, "what": what, "rank_ms": times, "ms": max(times), "x_one_device": max(times) / base})
            print(f"  {what}: slowest rank {max(times):.2f} ms = {max(times) / base:.3f} x one device", flush=True)
    if args.json:
        meta = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump(meta | {"rows": rows, "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
