"""Gated DeltaNet and KDA kernels beside their peers, forward and forward+backward, bf16, on one GPU.

    python3 benchmarks/delta_rule.py --ops gdn kda --impls project jla fla --json out.json

Each (op, shape, contender) runs in its own process under its own time limit (fla's autotuning can
take minutes per shape), and each row is printed as it finishes. A contender that refuses the call
or fails is recorded with its last error line. Inputs as the peers' own benchmarks: q, k
L2-normalised, beta = sigmoid(x), g = logsigmoid(x) (KDA: logsigmoid(x)/16, one per key channel).
Forward+backward is o and the gradients of q, k, v, beta and g.

Set DELTA_RULE_PROFILE=DIR to also print the device time by kernel of the project's fwd+bwd.

Contenders:
  project      pallas_kernels.gated_delta_rule(..., impl="pallas")
  project_xla  the same op's chunked XLA path (impl="xla"), the CPU default
  jla          jax-linear-attention ops.linear_attention("gated_deltanet" | "kda", impl="mosaic_gpu")
  fla          flash-linear-attention chunk_gated_delta_rule / chunk_kda (PyTorch + Triton)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import forward_and_grads  # noqa: E402

SHAPES = [(1, 32768, 16, 128), (4, 8192, 16, 128), (1, 131072, 16, 128)]
IMPLS = ("project", "project_xla", "jla", "fla")
HBM_BYTES_PER_S = 4.8e12  # H200 datasheet


def floor_ms(op: str, b: int, t: int, h: int, d: int) -> tuple[float, float]:
    """Memory floors (ms): every input read once and every output written once (bf16; g float32)."""
    tokens = b * t * h
    gate = 4 * (d if op == "kda" else 1)
    fwd = tokens * (2 * 4 * d + 2 + gate)  # q, k, v, o; beta; g
    bwd = tokens * (2 * 4 * d + 2 + gate) + tokens * (2 * 3 * d + 2 + gate)  # fwd's reads + do; dq dk dv dbeta dg
    return fwd / HBM_BYTES_PER_S * 1e3, (fwd + bwd) / HBM_BYTES_PER_S * 1e3


def _jax_inputs(op, b, t, h, d, seed=0):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (b, t, h, d), jnp.float32)).astype(jnp.bfloat16)
    k = unit(jax.random.normal(ks[1], (b, t, h, d), jnp.float32)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, h, d), jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h), jnp.float32)).astype(jnp.bfloat16)
    if op == "kda":
        g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h, d), jnp.float32)) / 16
    else:
        g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h), jnp.float32))
    do = jax.random.normal(ks[5], (b, t, h, d), jnp.bfloat16)
    return q, k, v, beta, g, do


def _jax_time(fn, *args, n=30) -> float:
    import jax
    import numpy as np

    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def time_config(row: dict, make_fns, inputs: tuple, do, *, reps: int) -> dict:
    """A sweep row: ``row`` with ``fwd_ms`` and ``fwd_bwd_ms`` of ``make_fns() -> (_, fwd, fwd_bwd)``
    on ``inputs`` (and ``do`` for fwd_bwd), or ``error`` when the config fails (a result, not the
    end of the sweep), and ``wall_s``."""
    t0 = time.perf_counter()
    try:
        _, fwd, fwd_bwd = make_fns()
        row["fwd_ms"] = _jax_time(fwd, *inputs, n=reps)
        row["fwd_bwd_ms"] = _jax_time(fwd_bwd, *inputs, do, n=reps)
    except Exception as exc:  # noqa: BLE001 - a failing config is a result, not the end of the sweep
        # the message up to jax's note on filtered traceback frames (after a line of dashes)
        text = "".join(traceback.format_exception_only(exc)).split("\n--------------------\n")[0]
        lines = [ln for ln in text.splitlines() if ln.strip()]
        row["error"] = (lines[-1] if lines else repr(exc))[:400]
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _time_jax_op(attn, op, shape):
    import jax

    q, k, v, beta, g, do = _jax_inputs(op, *shape)
    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(functools.partial(forward_and_grads, attn))
    times = _jax_time(fwd, q, k, v, beta, g), _jax_time(fwd_bwd, q, k, v, beta, g, do)
    if os.environ.get("DELTA_RULE_PROFILE"):  # device time by kernel of one fwd+bwd, to stderr
        from benchmarks.sequence_parallel import print_kernels, profile_kernels

        path = os.path.join(os.environ["DELTA_RULE_PROFILE"], f"{op}_{'x'.join(map(str, shape))}")
        with contextlib.redirect_stdout(sys.stderr):
            print_kernels(f"{op} {shape} fwd", profile_kernels(fwd, (q, k, v, beta, g), path + "_fwd"), top=8)
            print_kernels(f"{op} {shape} fwd+bwd", profile_kernels(fwd_bwd, (q, k, v, beta, g, do), path), top=12)
    return times


def run_project(op, shape, impl="pallas"):
    from pallas_kernels import gated_delta_rule

    def attn(q, k, v, beta, g):
        return gated_delta_rule(q, k, v, beta, g=g, impl=impl)[0]

    return _time_jax_op(attn, op, shape)


def run_project_xla(op, shape):
    return run_project(op, shape, impl="xla")


def run_jla(op, shape):
    from jla import ops

    kind = {"gdn": "gated_deltanet", "kda": "kda"}[op]

    def attn(q, k, v, beta, g):
        return ops.linear_attention(kind, q, k, v, g=g, beta=beta, impl="mosaic_gpu")[0]

    return _time_jax_op(attn, op, shape)


def run_fla(op, shape):
    import torch
    from triton.testing import do_bench

    b, t, h, d = shape
    dev = "cuda"
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    q = unit(torch.randn(b, t, h, d, device=dev)).bfloat16().requires_grad_()
    k = unit(torch.randn(b, t, h, d, device=dev)).bfloat16().requires_grad_()
    v = torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    beta = torch.randn(b, t, h, device=dev).sigmoid().bfloat16().requires_grad_()
    if op == "kda":
        from fla.ops.kda import chunk_kda as fn

        g = (torch.nn.functional.logsigmoid(torch.randn(b, t, h, d, device=dev)) / 16).requires_grad_()
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn

        g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=dev)).requires_grad_()
    do = torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16)
    forward = lambda: fn(q, k, v, g, beta)[0]  # noqa: E731
    t_fwd = do_bench(forward, warmup=50, rep=200, return_mode="median")
    t_fb = do_bench(
        lambda: forward().backward(do), warmup=50, rep=200, return_mode="median", grad_to_none=[q, k, v, beta, g]
    )
    return t_fwd, t_fb


RUNNERS = {"project": run_project, "project_xla": run_project_xla, "jla": run_jla, "fla": run_fla}


def child(op: str, impl: str, shape) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    t_fwd, t_fb = RUNNERS[impl](op, tuple(shape))
    print(json.dumps({"fwd_ms": t_fwd, "fwd_bwd_ms": t_fb}))


def run_one(op, impl, shape, timeout) -> dict:
    cmd = [sys.executable, __file__, "--child", op, impl, *map(str, shape)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if os.environ.get("DELTA_RULE_PROFILE") and impl in ("project", "jla"):
        print(proc.stderr[-4000:], flush=True)
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
    # the exception's own line (jax prints a note about filtered frames after it)
    raised = [line for line in err if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exhausted|Exit)\b", line)]
    last = (raised or err)[-1:] if err else []
    return {"error": last[0][:300] if last else f"exit code {proc.returncode}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=["gdn", "kda"], choices=["gdn", "kda"])
    ap.add_argument("--impls", nargs="+", default=["project", "jla", "fla"], choices=IMPLS)
    ap.add_argument("--shapes", nargs="+", default=None, help="B,T,H,D entries (default: the three issue shapes)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per contender and shape")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, impl, *shape = args.child
        child(op, impl, list(map(int, shape)))
        return
    shapes = [tuple(map(int, s.split(","))) for s in args.shapes] if args.shapes else SHAPES
    rows = []
    for op in args.ops:
        for shape in shapes:
            f_fwd, f_fb = floor_ms(op, *shape)
            row = {"op": op, "shape": list(shape), "floor_fwd_ms": f_fwd, "floor_fwd_bwd_ms": f_fb}
            for impl in args.impls:
                row[impl] = run_one(op, impl, shape, args.timeout)
                print(json.dumps({"op": op, "shape": shape, impl: row[impl]}), flush=True)
            rows.append(row)
    print(
        "\nop | (B,T,H,D) | " + " | ".join(f"{i} fwd / fwd+bwd ms" for i in args.impls) + " | peer/project | roofline"
    )
    for row in rows:
        cells = []
        for impl in args.impls:
            r = row[impl]
            cells.append(
                f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f}" if "fwd_ms" in r else f"failed: {r['error'][:60]}"
            )
        ours = row.get("project", {}).get("fwd_bwd_ms")
        ratios = [
            f"{i} {row[i]['fwd_bwd_ms'] / ours:.2f}x"
            for i in args.impls
            if i != "project" and ours and "fwd_bwd_ms" in row[i]
        ]
        roof = f"{row['floor_fwd_bwd_ms'] / ours:.2f}" if ours else "-"
        print(f"{row['op']} | {tuple(row['shape'])} | " + " | ".join(cells) + f" | {' '.join(ratios)} | {roof}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
