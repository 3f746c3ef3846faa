#!/usr/bin/env python3
"""Single-GPU linear attention: the Pallas Triton kernels beside their peers, in one run.

Times forward and forward+backward medians (bf16) at the notes/design.md §5 shapes with a constant
per-head decay (``g_gamma``, lightning attention) and with a per-token decay (``g``), for

- ``project``: ``pallas_kernels.linear_attention.pallas_triton`` (this repository),
- ``fla``: flash-linear-attention ``chunk_simple_gla`` (PyTorch + Triton), when importable,
- ``jla``: jax-linear-attention ``ops.linear_attention("simple_gla", impl="mosaic_gpu")``,
  when importable,

and with per-channel gates (``--decay channel``: Gated Linear Attention, ``g [B, T, H, D]`` =
``logsigmoid(·) / 16``, notes/design.md §6) for ``project`` = ``pallas_kernels.linear_attention(g=g,
impl=...)`` once per ``--impl`` (``pallas``, ``xla``), ``fla`` = ``fla.ops.gla.chunk_gla`` and ``jla`` =
``ops.linear_attention("gla", impl="mosaic_gpu")``. Every implementation runs each shape in its own
process with its own time limit (``--timeout``); a case that raises, times out or cannot import its
peer is recorded as a row with ``error`` (printed and in the JSON), and the next one runs.

``--docs 0 16`` also times rows packed with 16 documents each (``segment_ids`` for the project
kernels, ``cu_seqlens`` — varlen, the rows flattened to one — for flash-linear-attention;
jax-linear-attention has no packed mode and is skipped there); the document boundaries are the
same random cut points for every implementation. Prints one table
(ms, TFLOP/s, fraction of the memory roofline, ratio of each peer's time to ours) and writes JSON
with ``--json``. Run on the GPU machine from the repository root:

    PYTHONPATH=$PWD python3 benchmarks/kernels.py --json kernels.json
    PYTHONPATH=$PWD python3 benchmarks/kernels.py --impls project --configs "num_warps=4" "split_dkdv=True"
    PYTHONPATH=$PWD python3 benchmarks/kernels.py --impls project fla --docs 0 16 --decay g_gamma
    PYTHONPATH=$PWD python3 benchmarks/kernels.py --decay channel --timeout 240 --json channel.json
    # CPU smoke run of the per-channel rows (the chunked XLA op at a tiny shape):
    JAX_PLATFORMS=cpu PYTHONPATH=$PWD python3 benchmarks/kernels.py --impls project --decay channel \
        --impl xla --shapes 1,64,2,16 --warmup 1 --iters 2

FLOP counts are nominal, for the chunked algorithm with C = 64 (forward per token and head:
``2·(C·D + C·E + 2·D·E)``, the backward twice that; the same count for per-channel gates, whose
decays are elementwise). The memory floor is the bytes that must move at least once (forward: read
q, k, v and write o; forward+backward adds reading q, k, v, dO and writing dq, dk, dv; per-channel
gates add reading the float32 g in each direction and writing dg), over the device-to-device copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import forward_and_grads  # noqa: E402

SHAPES = [(1, 32768, 16, 128), (4, 8192, 16, 128), (1, 131072, 16, 128), (8, 4096, 32, 128)]
CHANNEL_SHAPES = SHAPES[:2]  # the per-channel (GLA) rows' default shapes
DECAYS = ["g_gamma", "g"]  # the default run; "channel" (per-key-channel gates) on request
CHANNEL_IMPLS = ["pallas", "xla"]  # the project's linear_attention(impl=...) rows with per-channel gates
GATE_NORMALIZER = 16.0  # the GLA paper's: g = logsigmoid(·) / 16


def gamma_values(heads):
    """A spread of per-head log decays, as lightning attention uses (same as the peer script)."""
    return [-(8.0 / heads) * h / 8.0 - 1e-3 for h in range(heads)]


def flops(b, t, h, d, *, chunk=64, backward=False):
    fwd = 2.0 * b * t * h * (chunk * d + chunk * d + 2 * d * d)
    return fwd * (3 if backward else 1)


def bytes_moved(b, t, h, d, *, backward=False, itemsize=2, decay="g_gamma"):
    moved = b * t * h * d * itemsize * (11 if backward else 4)
    if decay == "channel":  # float32 g read by the forward (and again by the backward), dg written
        moved += b * t * h * d * 4 * (3 if backward else 1)
    return moved


# ---- children: one process per implementation ------------------------------------------------


WARMUP, ITERS = 3, 30


def doc_starts(b, t, docs):
    """Start positions of the documents of each row: ``docs`` documents per row (0: unpacked),
    cut at the same seeded random points for every implementation."""
    import numpy as np

    if docs <= 1:
        return [[0] for _ in range(b)]
    rng = np.random.default_rng(1234)
    return [[0, *sorted(rng.choice(np.arange(1, t), docs - 1, replace=False).tolist())] for _ in range(b)]


def _segment_ids(b, t, docs):
    import jax.numpy as jnp
    import numpy as np

    ids = np.zeros((b, t), np.int32)
    for row, starts in enumerate(doc_starts(b, t, docs)):
        for i, start in enumerate(starts):
            ids[row, start:] = i
    return jnp.asarray(ids)


def _jax_median_ms(fn, *args, iters=None):
    from benchmarks.timing import median_ms

    return median_ms(fn, *args, reps=ITERS if iters is None else iters, warmup=WARMUP)


def _jax_inputs(b, t, h, d, decay):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v, do = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in keys[:4])
    if decay == "g_gamma":
        return (q, k, v, do), jnp.asarray(gamma_values(h), jnp.float32)
    if decay == "channel":
        return (q, k, v, do), jax.nn.log_sigmoid(
            jax.random.normal(keys[4], (b, t, h, d), jnp.float32)
        ) / GATE_NORMALIZER
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, t, h), jnp.float32) + 4.0)
    return (q, k, v, do), g


def _copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256 * 1024 * 1024 if jax.default_backend() == "gpu" else 1024 * 1024,), jnp.float32)
    fn = jax.jit(lambda x: x + 1)
    ms = _jax_median_ms(fn, x, iters=max(ITERS, 5))
    return 2 * x.size * 4 / (ms * 1e-3)


def _cases(shapes, decays, docs_list, configs=({},)):
    for shape in shapes:
        for decay in decays:
            for docs in docs_list:
                for overrides in configs:
                    yield shape, decay, docs, overrides


def _timed(row, fwd, fwd_bwd, *args):
    """Adds the fwd and fwd+bwd medians to ``row`` (or the error) and prints it as a JSON line."""
    try:
        row["fwd_ms"] = fwd(*args[:-1])
        row["fwd_bwd_ms"] = fwd_bwd(*args)
    except Exception as ex:  # report and go on with the next case
        row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
    print(json.dumps(row), flush=True)


def _project_channel(shape, docs, impls):
    """Per-channel rows: ``pallas_kernels.linear_attention(g=[B, T, H, D], impl=...)`` per impl."""
    import jax

    from pallas_kernels import linear_attention

    (q, k, v, do), g = _jax_inputs(*shape, "channel")
    seg = _segment_ids(shape[0], shape[1], docs) if docs else None
    for impl in impls:

        def attn(q, k, v, g, impl=impl):
            return linear_attention(q, k, v, g=g, segment_ids=seg, impl=impl)[0]

        fwd = functools.partial(_jax_median_ms, jax.jit(attn))
        fwd_bwd = functools.partial(_jax_median_ms, jax.jit(functools.partial(forward_and_grads, attn)))
        row = {"shape": shape, "decay": "channel", "docs": docs, "config": {"impl": impl}}
        _timed(row, fwd, fwd_bwd, q, k, v, g, do)


def child_project(shapes, decays, configs, docs_list, impls=CHANNEL_IMPLS):
    import dataclasses

    import jax

    from pallas_kernels.linear_attention import pallas_triton
    from pallas_kernels.linear_attention.config import default_config

    print(json.dumps({"bandwidth": _copy_bandwidth(), "jax": jax.__version__, "device": jax.devices()[0].device_kind}))
    for shape, decay, docs, overrides in _cases(shapes, decays, docs_list, configs):
        if decay == "channel":  # the public op (its impls), not one kernel's block configs
            if not overrides:
                _project_channel(shape, docs, impls)
            continue
        (q, k, v, do), gate = _jax_inputs(*shape, decay)
        # the kernels' own default for these inputs (head dim and dtype pick the backward's tiling)
        base = default_config(
            batch=shape[0], heads=shape[2], seq_len=shape[1], interpret=False, head_dim=shape[3], dtype=q.dtype
        )
        cfg = dataclasses.replace(base, **overrides)
        seg = _segment_ids(shape[0], shape[1], docs) if docs else None

        def attn(q, k, v, gate, cfg=cfg, decay=decay, seg=seg):
            kw = {"g_gamma": gate} if decay == "g_gamma" else {"g": gate}
            return pallas_triton.linear_attention(q, k, v, **kw, segment_ids=seg, config=cfg)[0]

        fwd = functools.partial(_jax_median_ms, jax.jit(attn))
        fwd_bwd = functools.partial(_jax_median_ms, jax.jit(functools.partial(forward_and_grads, attn)))
        row = {"shape": shape, "decay": decay, "docs": docs, "config": overrides}
        _timed(row, fwd, fwd_bwd, q, k, v, gate, do)


def child_jla(shapes, decays, configs, docs_list, impls=None):
    import jax
    import jax.numpy as jnp
    from jla import ops

    for shape, decay, _, _ in _cases(shapes, decays, [0]):  # no packed-document mode
        (q, k, v, do), gate = _jax_inputs(*shape, decay)
        if decay == "g_gamma":
            gate = jnp.broadcast_to(gate, shape[:3]).astype(jnp.float32)
        kind = "gla" if decay == "channel" else "simple_gla"

        def attn(q, k, v, g, kind=kind):
            return ops.linear_attention(kind, q, k, v, g=g, impl="mosaic_gpu")[0]

        fwd = functools.partial(_jax_median_ms, jax.jit(attn))
        fwd_bwd = functools.partial(_jax_median_ms, jax.jit(functools.partial(forward_and_grads, attn)))
        _timed({"shape": shape, "decay": decay, "docs": 0}, fwd, fwd_bwd, q, k, v, gate, do)


def _fla_case(b, t, h, d, decay, docs):
    import torch
    from triton.testing import do_bench

    if decay == "channel":
        from fla.ops.gla import chunk_gla as op
    else:
        from fla.ops.simple_gla import chunk_simple_gla as op

    q, k, v, do = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    if decay == "g_gamma":
        kw = {"g_gamma": torch.tensor(gamma_values(h), device="cuda")}
    elif decay == "channel":
        kw = {"g": torch.nn.functional.logsigmoid(torch.randn(b, t, h, d, device="cuda")) / GATE_NORMALIZER}
    else:
        kw = {"g": torch.nn.functional.logsigmoid(torch.randn(b, t, h, device="cuda") + 4.0)}
    if docs:  # varlen: rows flattened into one, documents delimited by cu_seqlens
        starts = [row * t + s for row, row_starts in enumerate(doc_starts(b, t, docs)) for s in row_starts]
        kw["cu_seqlens"] = torch.tensor(starts + [b * t], device="cuda", dtype=torch.long)
        kw["cu_seqlens_cpu"] = kw["cu_seqlens"].cpu()
        q, k, v, do = (x.reshape(1, b * t, h, d) for x in (q, k, v, do))
        if "g" in kw:
            kw["g"] = kw["g"].reshape(1, b * t, *kw["g"].shape[2:])
    grads = [x.requires_grad_() for x in (q, k, v, kw.get("g")) if x is not None]

    def fwd():
        return op(q, k, v, **kw)[0]

    def fwd_bwd():
        fwd().backward(do)

    return {
        "fwd_ms": do_bench(fwd, return_mode="median"),
        "fwd_bwd_ms": do_bench(fwd_bwd, return_mode="median", grad_to_none=grads),
    }


def child_fla(shapes, decays, configs, docs_list, impls=None):
    import torch

    for shape, decay, docs, _ in _cases(shapes, decays, docs_list):
        row = {"shape": shape, "decay": decay, "docs": docs}
        try:
            row |= _fla_case(*shape, decay, docs)
        except Exception as ex:
            row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


CHILDREN = {"project": child_project, "fla": child_fla, "jla": child_jla}


# ---- parent: run the children, print the table -----------------------------------------------


def _expected(name, shape, args):
    """The (shape, decay, docs) cases a child of ``name`` reports rows for at ``shape``."""
    docs_list = [0] if name == "jla" else args.docs  # jla has no packed-document mode
    return [(shape, decay, docs) for decay in args.decay for docs in docs_list]


def _run_child(name, shape, args):
    """Run implementation ``name`` at one shape in its own process, killed after ``args.timeout`` s.

    Returns its rows, plus an ``error`` row for every case it did not report (an import failure, a
    crash or the time limit), so a peer that refuses or hangs is recorded as such.
    """
    cmd = [sys.executable, __file__, "--child", name, "--shapes", ",".join(map(str, shape))]
    cmd += ["--decay", *args.decay, "--configs", *args.configs, "--impl", *args.impl]
    cmd += ["--warmup", str(args.warmup), "--iters", str(args.iters), "--docs", *map(str, args.docs)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    rows, deadline = [], time.monotonic() + args.timeout
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        for line in proc.stdout:  # echoed as they come, so an outer time limit keeps what finished
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(f"[{name}] {line.strip()}", flush=True)
        proc.wait()
        timer.cancel()
        err_file.seek(0)
        err = err_file.read()
    lines = err.strip().splitlines()
    tail = "\n".join(lines[-5:])
    if time.monotonic() >= deadline:
        reason = f"timed out after {args.timeout} s"
    else:  # the exception's own line (an import error, a refusal, a crash)
        reason = f"exited with status {proc.returncode}: {(lines or ['no output'])[-1][-300:]}"
    seen = {(tuple(r["shape"]), r["decay"], r.get("docs", 0)) for r in rows if "shape" in r}
    for shape_, decay, docs in _expected(name, shape, args):
        if (shape_, decay, docs) not in seen:
            row = {"shape": shape_, "decay": decay, "docs": docs, "error": reason}
            rows.append(row)
            print(f"[{name}] {json.dumps(row)}", flush=True)
    if tail and (any("error" in r for r in rows) or proc.returncode):
        print(f"[{name}] {tail}", file=sys.stderr)
    return rows


def _parse_config(text):
    """'num_warps=4,split_dkdv=True' -> {'num_warps': 4, 'split_dkdv': True} ('' is the default)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key.strip()] = json.loads(value.strip().lower())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="*", default=list(CHILDREN), help="project, fla, jla")
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D (default: §5's; two for --decay channel)")
    ap.add_argument("--decay", nargs="*", default=DECAYS, choices=[*DECAYS, "channel"])
    ap.add_argument("--impl", nargs="*", default=CHANNEL_IMPLS, choices=CHANNEL_IMPLS, help="project rows of channel")
    ap.add_argument("--configs", nargs="*", default=[""], help="BlockConfig overrides of the project kernels")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per implementation and shape")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    ap.add_argument("--iters", type=int, default=30, help="timed calls (the median is reported)")
    ap.add_argument("--docs", nargs="*", type=int, default=[0], help="documents packed per row (0: unpacked)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shapes is None:
        args.shapes = CHANNEL_SHAPES if args.decay == ["channel"] else SHAPES
    else:
        args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    if args.child:  # also the way to run one implementation alone, e.g. under a profiler
        global WARMUP, ITERS
        WARMUP, ITERS = args.warmup, args.iters
        configs = [_parse_config(c) for c in args.configs]
        CHILDREN[args.child](args.shapes, args.decay, configs, args.docs, impls=args.impl)
        return

    results, info = {}, {}
    for name in args.impls:
        for shape in args.shapes:
            for row in _run_child(name, shape, args):
                if "bandwidth" in row:
                    info = row
                    continue
                key = (tuple(row["shape"]), row["decay"], row.get("docs", 0))
                results.setdefault(key, {}).setdefault(name, []).append(row)
    bandwidth = info.get("bandwidth", 3.0e12)
    print(
        f"\ndevice: {info.get('device', '?')}, jax {info.get('jax', '?')}, copy bandwidth {bandwidth / 1e12:.2f} TB/s"
    )
    header = "shape (B,T,H,D) | decay | docs/row | impl [config] | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s"
    header += " | memory roofline | peer/project"
    print(header + "\n" + "-" * len(header))
    table = []
    for (shape, decay, docs), by_impl in results.items():
        project = [r for r in by_impl.get("project", []) if "fwd_bwd_ms" in r]
        best = min(project, key=lambda r: r["fwd_bwd_ms"]) if project else None
        for name, rows in by_impl.items():
            for row in rows:
                cfg = ",".join(f"{k}={v}" for k, v in row.get("config", {}).items())
                cfg = f" [{cfg}]" if name == "project" and cfg else ""
                if "fwd_bwd_ms" not in row:
                    print(f"{shape} | {decay} | {docs} | {name}{cfg} | failed: {row.get('error', '?')}")
                    table.append(row | {"impl": name})
                    continue
                floor_ms = bytes_moved(*shape, backward=True, decay=decay) / bandwidth * 1e3
                tflops = flops(*shape, backward=True) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                ratio = ""
                if name != "project" and best:
                    ratio = f"{row['fwd_bwd_ms'] / best['fwd_bwd_ms']:.2f}x"
                print(
                    f"{shape} | {decay} | {docs} | {name}{cfg} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | "
                    f"{tflops:.0f} | {floor_ms / row['fwd_bwd_ms']:.2f} | {ratio}"
                )
                table.append(
                    row
                    | {
                        "impl": name,
                        "fwd_bwd_tflops": tflops,
                        "fwd_bwd_roofline_fraction": floor_ms / row["fwd_bwd_ms"],
                        "fwd_roofline_fraction": bytes_moved(*shape, decay=decay) / bandwidth * 1e3 / row["fwd_ms"],
                        "fwd_tflops": flops(*shape) / (row["fwd_ms"] * 1e-3) / 1e12,
                    }
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
