"""The gated delta rule under sequence parallelism: every strategy against one GPU at the local shape.

    python3 benchmarks/delta_rule_sp.py --ops gdn kda --tokens-per-gpu 32768 --json out.json
    python3 benchmarks/delta_rule_sp.py --ops gdn --heads 32 --strategies ring --sp-splits 1 2 4 --no-peer

On P GPUs (all visible devices), B=1, T = P × tokens-per-gpu, H=16, D=128, bf16: forward+backward
(o and the gradients of q, k, v, beta, g) of ``lasp_jax.lasp_gated_delta_rule`` for each strategy,
the single-device op at the local shape (what a rank's own work would cost alone), and, when
jax-linear-attention is importable, its ``context_parallel_linear_attention`` (plain-JAX chunked op
per shard) on the same mesh. Ratios are to the one-GPU local time. Inputs as benchmarks/delta_rule.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing  # noqa: E402
from benchmarks.delta_rule import _jax_inputs  # noqa: E402


@contextlib.contextmanager
def sp_splits(splits: int | None, block_e: int | None = None):
    """While active (and while a function is traced), the split entry points of the sharded delta
    rule (``pallas_triton_split.split_forward``) cut each shard into ``splits`` runs instead of the
    default config's count (and use ``block_e``-wide value blocks); None leaves the default. For
    sweeps only: the layer has no such option.
    Two ranks without initial or final state under scalar or no gates run one run whatever this
    says where the shard's default is one run (no Φ is formed there, and the runs would need it to
    compose)."""
    from pallas_kernels.gated_delta_rule import pallas_triton_split

    if splits is None and block_e is None:
        yield
        return
    default = pallas_triton_split.default_config

    def with_splits(**kw):
        cfg = default(**kw)
        return dataclasses.replace(cfg, splits=splits or cfg.splits, block_e=block_e or cfg.block_e)

    pallas_triton_split.default_config = with_splits
    try:
        yield
    finally:
        pallas_triton_split.default_config = default


def _fwd_bwd(attn):
    import jax

    return jax.jit(functools.partial(timing.forward_and_grads, attn))


def _time(fn, args) -> float:
    return timing.median_ms(fn, *args, reps=10, warmup=2, inner=3)


def run(
    op: str, tokens_per_gpu: int, strategies, h: int, d: int, with_peer: bool, splits=(None,), block_e=None
) -> list[dict]:
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from lasp_jax import lasp_gated_delta_rule
    from pallas_kernels import gated_delta_rule

    p = jax.device_count()
    rows = []
    local = _jax_inputs(op, 1, tokens_per_gpu, h, d)
    one = _fwd_bwd(lambda q, k, v, beta, g: gated_delta_rule(q, k, v, beta, g=g)[0])
    base = _time(one, local)
    rows.append({"op": op, "what": "1 GPU, local shape", "T": tokens_per_gpu, "fwd_bwd_ms": base, "ratio": 1.0})
    print(json.dumps(rows[-1]), flush=True)
    mesh = Mesh(jax.devices(), ("sp",))
    full = _jax_inputs(op, 1, p * tokens_per_gpu, h, d, seed=1)
    sharded = [jax.device_put(x, NamedSharding(mesh, P(None, "sp"))) for x in full]
    contenders = {
        (s + ("" if n is None else f", {n} splits") + ("" if block_e is None else f", block_e {block_e}"), n): (
            lambda q, k, v, beta, g, s=s: lasp_gated_delta_rule(q, k, v, beta, g=g, mesh=mesh, strategy=s)[0]
        )
        for s in strategies
        for n in splits
    }
    if with_peer:
        try:
            from jla.distributed.context_parallel import context_parallel_linear_attention

            kind = {"gdn": "gated_deltanet", "kda": "kda"}[op]
            contenders["jla context_parallel", None] = lambda q, k, v, beta, g: context_parallel_linear_attention(
                kind, q, k, v, g=g, beta=beta, mesh=mesh, axis="sp"
            )[0]
        except ImportError as err:
            print(f"jax-linear-attention not importable: {err}", flush=True)
    for (name, n), attn in contenders.items():
        try:
            with sp_splits(n, block_e):  # the first call traces (the peer never reaches our split kernels)
                ms = _time(_fwd_bwd(attn), sharded)
            row = {"op": op, "what": name, "T": p * tokens_per_gpu, "fwd_bwd_ms": ms, "ratio": ms / base}
        except Exception as err:  # record and go on: one contender's failure is a result
            row = {"op": op, "what": name, "T": p * tokens_per_gpu, "error": f"{type(err).__name__}: {err}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=["gdn", "kda"], choices=["gdn", "kda"])
    ap.add_argument("--tokens-per-gpu", type=int, default=32768)
    ap.add_argument("--strategies", nargs="+", default=["allgather", "ring", "scan", "ulysses"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument(
        "--sp-splits",
        type=int,
        nargs="+",
        default=None,
        help="runs per shard of the split entry points, one row each (default: the config's)",
    )
    ap.add_argument("--sp-block-e", type=int, default=None, help="value-block width of the split entry points")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for op in args.ops:
        splits = args.sp_splits or [None]
        rows += run(
            op,
            args.tokens_per_gpu,
            args.strategies,
            args.heads,
            args.head_dim,
            not args.no_peer,
            splits,
            args.sp_block_e,
        )
    print("\nop | what | T | fwd+bwd ms | × 1 GPU at the local shape")
    for r in rows:
        cell = f"{r['fwd_bwd_ms']:.3f} | {r['ratio']:.2f}" if "fwd_bwd_ms" in r else f"failed: {r['error'][:80]} |"
        print(f"{r['op']} | {r['what']} | {r['T']} | {cell}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
