"""A rank's own work in the sequence-parallel gated delta rule, timed on one GPU, per shard config.

    python3 benchmarks/delta_rule_rank_work.py --ops gdn --json out.json
    python3 benchmarks/delta_rule_rank_work.py --smoke          # CPU, interpret mode, tiny shape

Under ``lasp_gated_delta_rule`` (Pallas kernels) a rank runs the split entry points of
``pallas_kernels.gated_delta_rule.pallas_triton_split``: ``split_forward`` (WY form and the shard's
transition ``(Φ, M)``, or M alone), ``finish_forward`` from the entering state,
``split_backward`` (the local reverse pass and the output's gradients) and ``finish_backward`` from
the leaving state's cotangent. This script runs exactly that chain on one device, with the entering
state and the leaving cotangent taken from the rank's own ``M`` and ``dS_in_local`` (so each waits
on the pass that forms it, as the collectives make it wait), and without the collectives themselves
(at two ranks one all-gather of ``[B, Hv, D, D + E]`` float32 each way, 2 MiB at 16 heads). Rows:
the single-device op at the same shape (the ratio's base, as ``benchmarks/delta_rule_sp.py``'s
"1 GPU, local shape"), the shard's default config, then ``--runs`` × ``--block-e`` variants, with Φ
and (one run) without. Inputs as ``benchmarks/delta_rule.py``; fwd+bwd, median ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing  # noqa: E402
from benchmarks.delta_rule import _jax_inputs  # noqa: E402


def rank_chain(config, with_phi: bool, interpret: bool):
    """fwd+bwd of one rank: ``(q, k, v, beta, g, do) -> (o, dq, dk, dv, dbeta, dg)``."""
    import jax

    from pallas_kernels.gated_delta_rule import pallas_triton_split as split

    def chain(q, k, v, beta, g, do):
        phi, m, call = split.split_forward(q, k, v, beta, g=g, interpret=interpret, config=config, with_phi=with_phi)
        s_in = m if phi is None else m + phi[..., : m.shape[-1]]  # stands in for the gathered prefix
        o, _, residuals = split.finish_forward(call, s_in)
        ds_local, stage = split.split_backward(call, residuals, do)
        grads = split.finish_backward(call, residuals, stage, ds_local)
        return o, grads[:5]

    return jax.jit(chain)


def single(interpret: bool):
    import jax

    from pallas_kernels.gated_delta_rule import pallas_triton

    def attn(q, k, v, beta, g):
        return pallas_triton.gated_delta_rule(q, k, v, beta, g=g, interpret=interpret)[0]

    return jax.jit(functools.partial(timing.forward_and_grads, attn))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=["gdn"], choices=["gdn", "kda"])
    ap.add_argument("--shape", default="1,32768,16,128", help="B,T,H,D of one rank's shard")
    ap.add_argument("--runs", type=int, nargs="+", default=None, help="default 1 2 4 8 (smoke: 1 2)")
    ap.add_argument("--block-e", type=int, nargs="+", default=None, help="default 16 32 64 (smoke: 16)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import jax

    from pallas_kernels.gated_delta_rule import pallas_triton_split as split

    if args.smoke:
        args.shape, args.reps = "1,256,2,32", 1
    args.runs = args.runs or ([1, 2] if args.smoke else [1, 2, 4, 8])
    args.block_e = args.block_e or ([16] if args.smoke else [16, 32, 64])
    b, t, h, d = (int(x) for x in args.shape.split(","))
    interpret = args.smoke
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, shard (B, T, H, D) = {(b, t, h, d)}", flush=True)
    rows = []
    for op in args.ops:
        q, k, v, beta, g, do = _jax_inputs(op, b, t, h, d)
        base = timing.median_ms(single(interpret), q, k, v, beta, g, do, reps=args.reps, warmup=2)
        rows.append({"op": op, "what": "single-device op", "ms": base, "ratio": 1.0})
        print(json.dumps(rows[-1]), flush=True)
        default = split.shard_config(q, k, v, g, interpret=interpret)
        todo = [("shard default", default, True)]
        todo += [
            (f"runs {n}, block_e {e}", dataclasses.replace(default, splits=n, block_e=e), True)
            for n in args.runs
            for e in args.block_e
            if e <= d
        ]
        if op == "gdn":  # M alone (two ranks, no initial or final state): one run
            todo += [(f"M only, block_e {e}", dataclasses.replace(default, block_e=e), False) for e in args.block_e]
        for what, cfg, with_phi in todo:
            runs = cfg.splits if with_phi else 1  # split_forward runs M alone as one run
            row = {"op": op, "what": what, "splits": runs, "block_e": cfg.block_e, "with_phi": with_phi}
            try:
                ms = timing.median_ms(
                    rank_chain(cfg, with_phi, interpret), q, k, v, beta, g, do, reps=args.reps, warmup=2
                )
                row |= {"ms": ms, "ratio": ms / base}
            except Exception as err:  # a config that fails is a result
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        meta = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump(meta | {"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
