#!/usr/bin/env python3
"""Sweep of the Pallas Triton flash-attention BlockConfig beside cuDNN, one GPU, with a time limit per config.

    PYTHONPATH=$PWD python3 benchmarks/flash_sweep.py --out flash_sweep.json
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python3 benchmarks/flash_sweep.py --quick --out /tmp/flash_sweep.json

Times single-device causal attention, forward and forward+backward, as training runs it:
``pallas_triton.flash_attention(q, k, v, config=cfg)`` (one ``custom_vjp`` over the block kernels;
the kernels write o and the gradients in the input dtype) at causal 32K, H32 Hk8 D128 bf16 for a
list of configs (``CONFIGS``: the default, then forward tilings and backward variants, in order of
interest), and ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`` in the same
run; last, as a peer, jax's own Pallas Mosaic GPU attention forward (fp16; it has no causal
backward): what Hopper warpgroup kernels reach on this shape. Each row: forward ms,
forward+backward ms (one jitted ``jax.vjp``: o and dq, dk, dv), the backward as their difference,
both as multiples of cuDNN's, TFLOP/s over the causal pairs (4·D per pair and head forward, 10·D
backward, FlashAttention-2's count whatever the variant computes), and the largest relative error
of o, dq, dk, dv against cuDNN's (a variant that computes something else
shows). A forward tiling timed once is not timed again. At the end, if time is left, the fastest
forward tiling and the fastest backward run together (row ``best``), and the BlockConfig to make
the default is printed.

Every config runs in a worker process that reports rows as they finish; a config that passes
``--limit`` seconds (compilation included) is recorded as timed out, its worker is killed and a
fresh one goes on with the next config. No config starts after ``--budget`` seconds. The JSON file
is rewritten after every row, so a run cut short keeps what finished.

``--quick``: a CPU smoke run (the Pallas interpreter, a tiny shape, a few small-block configs, the
XLA attention as the reference); ``tests/pallas_kernels/test_flash_attention.py`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TAG = "@@flash_sweep "

# (name, overrides of the default BlockConfig), in order of interest: the default first, then the
# backward variants (the larger lever: split computes 7 tile products, fused 5 plus float32 atomics),
# then forward tilings. "dkv128" tiles: 128 key rows (the dk/dv accumulators) × 64 query columns,
# 8 warps (two warpgroups of 64 rows), FlashAttention-2's backward shape for 128-wide heads.
DKV128 = dict(block_k_dkv=128, block_q_dkv=64, num_warps_bwd=8)
CONFIGS = [
    ("default", {}),
    ("fused-dkv128-w8", dict(backward="fused", **DKV128)),
    ("split-dq128-dkv128-w8", dict(block_q_dq=128, block_k_dq=64, **DKV128)),
    ("fwd-128x128-s3", dict(block_k=128)),
    ("fused-dkv64-w4", dict(backward="fused")),
    ("split-dq64w4-dkv128w8", dict(num_warps_dq=4, **DKV128)),
    ("fused-dkv128x32-w8", dict(backward="fused", block_k_dkv=128, block_q_dkv=32, num_warps_bwd=8)),
    ("split-dq128w8-dkv64w4", dict(block_q_dq=128, block_k_dq=64, num_warps_dq=8)),
    ("fused-dkv128-w8-s3", dict(backward="fused", num_stages_bwd=3, **DKV128)),
    ("split-s3", dict(num_stages_bwd=3)),
    ("fwd-128x128-s2", dict(block_k=128, num_stages=2)),
    ("fwd-128x64-s4", dict(num_stages=4)),
    (
        "split-dq128x32-dkv128x32-w8",
        dict(block_q_dq=128, block_k_dq=32, block_k_dkv=128, block_q_dkv=32, num_warps_bwd=8),
    ),
    ("fused-dkv64-w4-s3", dict(backward="fused", num_stages_bwd=3)),
    ("fwd-64x64-w4", dict(block_q=64, block_k=64, num_warps=4)),
    ("split-dq64x128-dkv128-w8", dict(block_q_dq=64, block_k_dq=128, num_warps_dq=4, **DKV128)),
    ("split-dq64x128-dkv64x128-w4", dict(block_k_dq=128, block_q_dkv=128)),
]
QUICK_CONFIGS = [
    ("default", {}),
    ("fused", dict(backward="fused")),
    ("split-32", dict(block_q_dq=32, block_k_dq=16, block_k_dkv=32, block_q_dkv=16, num_warps_dq=4)),
    ("fwd-32x16", dict(block_q=32)),
]
# errors that leave the device as it was (the kernel did not compile or fit): the worker goes on
COMPILE_ERRORS = ("shared memory", "out of resource", "resource_exhausted")
FWD_FIELDS = ("block_q", "block_k", "num_warps", "num_stages")
BWD_FIELDS = (
    "block_q_dq",
    "block_k_dq",
    "block_k_dkv",
    "block_q_dkv",
    "num_warps_bwd",
    "num_stages_bwd",
    "num_warps_dq",
    "num_stages_dq",
    "backward",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file for the rows (rewritten after every row)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: interpreter, tiny shape")
    parser.add_argument("--configs", nargs="+", help="names from the list to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the configs and exit")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--limit", type=float, help="seconds per config, compilation included")
    parser.add_argument("--budget", type=float, help="no config starts after this many seconds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON list of configs, run in this process
    args = parser.parse_args(argv)
    gpu = dict(tokens=32768, heads=32, kv_heads=8, head_dim=128, reps=5, limit=45.0, budget=270.0)
    cpu = dict(tokens=64, heads=4, kv_heads=2, head_dim=16, reps=3, limit=240.0, budget=600.0)
    for name, value in (cpu if args.quick else gpu).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def config_items(args) -> list[dict]:
    # the reference row first: cuDNN, or XLA's attention in a --quick run on the CPU
    items = [{"name": "xla-dpa" if args.quick else "cudnn", "fields": {}, "reference": True}]
    items += [{"name": n, "fields": f} for n, f in (QUICK_CONFIGS if args.quick else CONFIGS)]
    if not args.quick:  # a peer, last: jax's Mosaic GPU attention forward
        items.append({"name": "jax-mgpu-fwd-fp16", "fields": {}, "peer": "mgpu"})
    if args.configs:
        known = {item["name"] for item in items}
        if unknown := set(args.configs) - known:
            raise SystemExit(f"unknown configs {sorted(unknown)}; --list shows them")
        items = [item for item in items if item["name"] in args.configs or item.get("reference")]
    return items


# ---- the worker: one process, the configs in turn ----------------------------------------------


def emit(kind: str, **payload):
    print(TAG + json.dumps({"kind": kind, **payload}), flush=True)


def run_worker(args, items: list[dict]):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.common import pad_dim
    from pallas_kernels.flash_attention import default_config

    b, t, h, hk, d = args.batch, args.tokens, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    inputs = (
        jax.random.normal(keys[0], (b, t, h, d), dtype),
        jax.random.normal(keys[1], (b, t, hk, d), dtype),
        jax.random.normal(keys[2], (b, t, hk, d), dtype),
        jax.random.normal(keys[3], (b, t, h, d), dtype),  # the output cotangent
    )
    pairs = b * h * t * (t + 1) // 2
    emit("hello", jax=jax.__version__, device=jax.devices()[0].device_kind, backend=jax.default_backend())
    bench = Bench(
        args=args,
        inputs=inputs,
        scale=d**-0.5,
        flop_fwd=4 * d * pairs,
        flop_bwd=10 * d * pairs,
        base=default_config(head_dim=pad_dim(d), interpret=args.quick, dtype=dtype),
        # on the CPU the second call of a jitted interpreter kernel is still slow (seconds): warm up twice
        warmup=2 if args.quick else 1,
    )
    for item in items:
        emit("start", name=item["name"])
        row = dict(item)
        try:
            row |= bench.time(item)
        except Exception as err:  # noqa: BLE001 (a config that does not compile or fit is a result)
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}" if str(err) else repr(err)
        emit("row", row=row)
        if "error" in row and not any(word in row["error"].lower() for word in COMPILE_ERRORS):
            sys.exit(3)  # a failed run may leave the device in an error state: the parent starts a fresh worker


def both_passes(attend):
    """Jitted forward ``(q, k, v) -> o`` and forward+backward ``(q, k, v, do) -> (o, dq, dk, dv)``."""
    import jax

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(attend, q, k, v)
        return (o, *vjp(do))

    return jax.jit(attend), jax.jit(fwd_bwd)


@dataclasses.dataclass
class Bench:
    """One worker's inputs, the reference results and the forward timings already taken."""

    args: argparse.Namespace
    inputs: tuple
    scale: float
    flop_fwd: int
    flop_bwd: int
    base: object  # the default BlockConfig
    warmup: int
    fwd_ms: dict = dataclasses.field(default_factory=dict)  # forward tiling -> ms
    want: list | None = None  # the reference's o, dq, dk, dv in float32

    @functools.cached_property
    def reference(self):
        """((jitted forward, jitted forward+backward), label) of the reference attention."""
        import jax

        impl = None if self.args.quick else "cudnn"  # the CPU smoke run checks against XLA's attention
        attend = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, scale=self.scale, is_causal=True, implementation=impl
        )
        return both_passes(attend), f"jax.nn.dot_product_attention(implementation={impl!r})"

    def rel_error(self, got) -> float:
        """The largest of ‖x − ref‖ / ‖ref‖ over the outputs given (o, and dq, dk, dv when given)."""
        import jax.numpy as jnp

        if self.want is None:
            (_, ref_fwd_bwd), _ = self.reference
            self.want = [x.astype(jnp.float32) for x in ref_fwd_bwd(*self.inputs)]
        errs = [jnp.linalg.norm(x.astype(jnp.float32) - y) / jnp.linalg.norm(y) for x, y in zip(got, self.want)]
        return max(float(e) for e in errs)

    def time(self, item: dict) -> dict:
        from benchmarks.timing import median_ms

        q, k, v, do = self.inputs
        if item.get("peer") == "mgpu":
            return self.time_mgpu_forward()
        if item.get("reference"):
            (fwd, fwd_bwd), config = self.reference
            tiling = None
        else:
            from pallas_kernels.flash_attention import pallas_triton

            cfg = dataclasses.replace(self.base, **item["fields"])
            attend = lambda q, k, v: pallas_triton.flash_attention(q, k, v, scale=self.scale, config=cfg)  # noqa: E731
            (fwd, fwd_bwd), config = both_passes(attend), repr(cfg)
            tiling = tuple(getattr(cfg, f) for f in FWD_FIELDS)
        if tiling is None or tiling not in self.fwd_ms:
            self.fwd_ms[tiling] = median_ms(fwd, q, k, v, reps=self.args.reps, warmup=self.warmup)
        row = {"config": config, "fwd_ms": self.fwd_ms[tiling]}
        row["fwd_bwd_ms"] = median_ms(fwd_bwd, q, k, v, do, reps=self.args.reps, warmup=self.warmup)
        row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
        row["tflops_fwd"] = self.flop_fwd / row["fwd_ms"] / 1e9
        row["tflops_fwd_bwd"] = (self.flop_fwd + self.flop_bwd) / row["fwd_bwd_ms"] / 1e9
        row["max_rel_err"] = self.rel_error(fwd_bwd(q, k, v, do))
        return row

    def time_mgpu_forward(self) -> dict:
        """jax's own Pallas Mosaic GPU attention (Hopper warpgroup kernels; causal forward only, fp16,
        no logit scale: q is scaled before): what a Mosaic GPU port of the forward could reach."""
        import jax
        import jax.numpy as jnp
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        from benchmarks.timing import median_ms

        cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        fwd = jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, cfg))
        q, k, v = self.inputs[:3]
        q, k, v = (q.astype(jnp.float32) * self.scale).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16)
        row = {"config": repr(cfg), "fwd_ms": median_ms(fwd, q, k, v, reps=self.args.reps, warmup=self.warmup)}
        row["tflops_fwd"] = self.flop_fwd / row["fwd_ms"] / 1e9
        row["max_rel_err"] = self.rel_error([fwd(q, k, v)])
        return row


# ---- the parent: workers, limits, the table --------------------------------------------------


def read_lines(stream, out: queue.Queue):
    for line in stream:
        out.put(line)
    out.put(None)


def spawn(args, items: list[dict], argv: list[str]):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", json.dumps(items)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def stop(proc):
    """Kill the worker we started (its own process group: compilers it started go with it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_items(args, argv, items: list[dict], rows: list[dict], meta: dict, start: float):
    """Run ``items`` in workers, appending finished rows to ``rows`` (printed and saved as they come)."""
    pending = list(items)
    while pending:
        if time.monotonic() - start > args.budget:
            rows.extend({"name": i["name"], "fields": i["fields"], "error": "skipped: --budget spent"} for i in pending)
            save(args, meta, rows)
            return
        proc, lines = spawn(args, pending, argv)
        started, deadline = None, time.monotonic() + args.limit + 60  # + the worker's start-up and reference
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                stop(proc)
                if started is None:
                    raise SystemExit("the worker timed out before its first config") from None
                add_row(args, meta, rows, dict(pending.pop(0), error=f"timed out after --limit {args.limit:.0f} s"))
                break
            if line is None:  # the worker ended
                stop(proc)
                if started is not None and pending and pending[0]["name"] == started:
                    add_row(args, meta, rows, dict(pending.pop(0), error=f"worker died (exit {proc.returncode})"))
                elif started is None:
                    raise SystemExit(f"the worker exited ({proc.returncode}) before its first config")
                break
            if not line.startswith(TAG):
                print(line, end="", flush=True)
                continue
            event = json.loads(line[len(TAG) :])
            if event["kind"] == "hello":
                meta.update({k: v for k, v in event.items() if k != "kind"})
            elif event["kind"] == "start":
                started, deadline = event["name"], time.monotonic() + args.limit
            elif event["kind"] == "row":
                pending.pop(0)
                add_row(args, meta, rows, event["row"])


def add_row(args, meta, rows, row):
    rows.append(row)
    print(format_row(row, rows), flush=True)
    save(args, meta, rows)


def save(args, meta, rows):
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def format_row(row: dict, rows: list[dict]) -> str:
    if "error" in row:
        return f"{row['name']:>30}  {row['error']}"
    ref = next((r for r in rows if r.get("reference") and "error" not in r), None)

    def cell(key, width, spec, ratio=False):
        if key not in row:  # a forward-only peer
            return f"{'—':>{width}}" + ("       " if ratio else "")
        text = f"{row[key]:{width}{spec}}"
        return text + (f" {row[key] / ref[key]:5.2f}x" if ratio and ref else "")

    cells = [
        cell("fwd_ms", 8, ".2f", ratio=True),
        cell("fwd_bwd_ms", 9, ".2f", ratio=True),
        cell("bwd_ms", 8, ".2f"),
        cell("tflops_fwd", 6, ".0f"),
        cell("tflops_fwd_bwd", 6, ".0f"),
        cell("max_rel_err", 9, ".1e"),
    ]
    return f"{row['name']:>30} " + " ".join(cells)


HEADER = (
    f"{'config':>30} {'fwd ms':>8} {'/ref':>6} {'fwd+bwd':>9} {'/ref':>6} {'bwd ms':>8} "
    f"{'TF fwd':>6} {'TF all':>6} {'max rel':>9}"
)


def best_combination(rows: list[dict]) -> dict | None:
    """The fastest forward tiling with the fastest backward (fields of two measured configs), unless
    one measured config already has both."""
    ok = [r for r in rows if "error" not in r and not r.get("reference") and not r.get("peer")]
    if not ok:
        return None
    by_fwd = min(ok, key=lambda r: r["fwd_ms"])
    by_bwd = min(ok, key=lambda r: r["bwd_ms"])
    fields = {f: v for f, v in by_bwd["fields"].items() if f in BWD_FIELDS}
    fields |= {f: v for f, v in by_fwd["fields"].items() if f in FWD_FIELDS}
    if any(r["fields"] == fields for r in ok):
        return None
    return {"name": "best", "fields": fields}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args, json.loads(args.worker))
        return
    items = config_items(args)
    if args.list:
        for item in items:
            print(f"{item['name']:>30}  {item['fields']}")
        return
    start = time.monotonic()
    shape = dict(batch=args.batch, tokens=args.tokens, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    meta = {"shape": shape, "dtype": args.dtype, "reps": args.reps, "limit_s": args.limit, "budget_s": args.budget}
    print(f"causal {shape} {args.dtype}; {len(items)} rows, --limit {args.limit:.0f} s, --budget {args.budget:.0f} s")
    print(HEADER, flush=True)
    rows: list[dict] = []
    run_items(args, argv, items, rows, meta, start)
    if (best := best_combination(rows)) and time.monotonic() - start + args.limit < args.budget:
        run_items(args, argv, [best], rows, meta, start)
    ok = [r for r in rows if "error" not in r and not r.get("reference") and not r.get("peer")]
    if ok:
        fastest = min(ok, key=lambda r: r["fwd_bwd_ms"])
        print(f"\nfastest forward+backward: {fastest['name']}  {fastest['config']}")
    print(f"{len(rows)} rows in {time.monotonic() - start:.0f} s" + (f", written to {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
