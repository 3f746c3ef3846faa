"""Compile time of the training step against depth, with the layers unrolled and under a scan.

For each depth in ``--layers`` the preset's model (``n_layers`` overridden; a hybrid keeps its
pattern) gets its full jitted training step (forward, backward, AdamW) traced, lowered and compiled
twice: blocks unrolled (``scan_layers=False``) and under one ``lax.scan`` over stacked parameters
(``scan_layers=True``, ``models.layer_scan``). It prints seconds to trace and lower, seconds to
compile, and the lines of the lowered program. A measurement, not a test: the lines show what the
compiler is given (flat in depth under the scan), the seconds what that costs on this machine.

    python benchmarks/compile_time.py --preset tnl-1b --layers 2 4 8 16           # one GPU
    python benchmarks/compile_time.py --smoke                                     # tiny model on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tnl-1b")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens", type=int, default=32768, help="sequence length of the one-row batch")
    p.add_argument("--remat", default="dots", help="none | dots | full | offload")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="the preset's tiny size on the CPU")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
        args.preset = args.preset if args.preset.endswith("tiny") else args.preset.rsplit("-", 1)[0] + "-tiny"
        args.tokens, args.dtype = min(args.tokens, 256), "float32"
    return args


def compile_step(args, n_layers: int, scan: bool) -> dict:
    """Trace, lower and compile one training step; seconds and lowered lines."""
    import jax

    from models.config import get_config
    from models.dataset import DataConfig
    from models.train import MeshConfig, OptimConfig, RunConfig, TrainConfig, Trainer

    model = get_config(args.preset, dtype=args.dtype, n_layers=n_layers, scan_layers=scan)
    config = TrainConfig(
        model=model,
        mesh=MeshConfig(dp=1, sp=1),
        optim=OptimConfig(lr=1e-4, warmup_steps=10),
        data=DataConfig(source="synthetic", batch_size=1, seq_len=args.tokens),
        run=RunConfig(steps=10, remat=args.remat, progress=False),
    )
    trainer = Trainer(config, devices=jax.devices()[:1], log=lambda *a: None)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(with_sharding, trainer.abstract_state, trainer.state_shardings)
    batch = jax.ShapeDtypeStruct((1, 1, args.tokens), jax.numpy.int32, sharding=trainer.batch_sharding)
    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(state, batch, batch)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    jax.clear_caches()
    return {
        "n_layers": n_layers,
        "scan_layers": scan,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "lowered_lines": len(lowered.as_text().splitlines()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    dev = jax.devices()[0]
    print(f"# compile time vs depth: {args.preset}, {args.tokens} tokens, remat {args.remat}, {dev.device_kind}")
    rows = [compile_step(args, n, scan) for n in args.layers for scan in (False, True)]
    print(f"{'layers':>6} {'layout':>8} {'lower s':>8} {'compile s':>10} {'HLO lines':>10}")
    for r in rows:
        layout = "scanned" if r["scan_layers"] else "unrolled"
        print(f"{r['n_layers']:>6} {layout:>8} {r['lower_s']:>8.2f} {r['compile_s']:>10.2f} {r['lowered_lines']:>10}")
    if args.json:
        with open(args.json, "w") as fh:
            out = {"device": dev.device_kind, "jax": jax.__version__, "args": vars(args), "rows": rows}
            json.dump(out, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
