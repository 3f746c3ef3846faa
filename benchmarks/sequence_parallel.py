"""Sequence-parallel linear attention: every strategy against the single-device kernel at the local shape.

For each strategy (ring, allgather, scan, ulysses, gather_kv) on all local devices (sp = device count,
a fixed number of tokens per device), this measures:

- forward and forward+backward wall time (median of ``--iters`` runs, outputs blocked on);
- the ratio of forward+backward to the single-device op on one device at the local shape
  ``(B, T/P, H, D)`` (what each device would do without sequence parallelism);
- the same program with every collective replaced by a local stand-in of the same shape (the
  numbers are wrong, the compute is the same): the difference is the communication time left
  exposed, i.e. not hidden behind the local kernels;
- the collectives of the compiled forward+backward program read from its HLO text: bytes each
  device sends per layer (standard ring algorithms: all-gather (P−1)·x, all-to-all and
  reduce-scatter (P−1)/P·x, all-reduce 2(P−1)/P·x, collective-permute x per source), their count,
  and for asynchronous collectives how many instructions the schedule places between start and
  done (work that can overlap the transfer);
- the compiled program's memory per device (arguments + outputs + temporaries).

Prints a table and writes JSON with ``--json PATH``. ``--smoke`` runs tiny shapes on 4 fake CPU
devices (a check that the script works, not a measurement). Collectives inside loops would be
counted once: the strategies here unroll their loops.

    python benchmarks/sequence_parallel.py                       # all GPUs, 32K tokens per GPU
    python benchmarks/sequence_parallel.py --latency-hiding --json sp.json   # let XLA overlap collectives
    python benchmarks/sequence_parallel.py --smoke --json /tmp/sp.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing  # noqa: E402  (imports nothing heavy: jax initialises later)

# peers measured by the project lead on 2×H200 (NVLink), 32K tokens per GPU, B=1, H=16, D=128,
# forward+backward of the attention op (../shared/bench/README.md); not re-measured here
RECORDED_PEERS_MS = {
    "original LASP (lasp_naive, torch.distributed)": 47.9,
    "jax-linear-attention context parallel": 47.7,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens-per-device", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--value-dim", type=int, default=None, help="default: --dim")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    p.add_argument(
        "--decay", choices=["g_gamma", "g", "channel", "none"], default="g_gamma", help="channel: GLA g [B, T, H, D]"
    )
    p.add_argument("--strategies", default="ring,allgather,scan,ulysses,gather_kv")
    p.add_argument("--impl", default="auto", help="local kernel: auto | pallas | xla")
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-overlap", action="store_true", help="skip the run with collectives removed")
    p.add_argument(
        "--profile",
        default=None,
        help="write a jax.profiler trace of each strategy under this folder and print its device time by kernel",
    )
    p.add_argument(
        "--latency-hiding",
        action="store_true",
        help="add --xla_gpu_enable_latency_hiding_scheduler=true to XLA_FLAGS (lets XLA overlap collectives)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on 4 fake CPU devices")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens_per_device, args.heads, args.dim = 64, 4, 16
        args.dtype, args.impl, args.warmup, args.iters = "f32", "xla", 1, 2
        args.devices = args.devices or 4
    return args


def _setup_smoke_devices(n: int):
    """Fake CPU devices for --smoke; only possible before jax initialises its backends."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# ------------------------------------------------------------------------- HLO collectives
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*?)\)(.*)$")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8\w*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_BYTES |= {"s64": 8, "u64": 8, "f64": 8}


def _type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 1)
    return total


def _group_size(attrs: str, mesh_shape: dict) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip("'\" "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= sizes.get(axis, mesh_shape.get(axis, 1))
        return n
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    return 1


def hlo_collectives(hlo_text: str, mesh_shape: dict) -> dict:
    """Collectives of a compiled module: count, operand bytes and bytes sent per device, by kind.

    Collectives over groups of one device (left on some backends by shard_map's transpose over
    size-1 mesh axes) move nothing: they are counted apart, as ``single_participant``.
    """
    shapes, order, found = {}, [], []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_text, op, operands, attrs = m.groups()
        shapes[name] = type_text
        order.append((name, op, operands))
        base = op.removesuffix("-start")
        if base in _COLLECTIVES and not op.endswith("-done"):
            found.append((name, base, op.endswith("-start"), operands, attrs))
    done_index = {}
    for i, (_, op, operands) in enumerate(order):
        if op.endswith("-done"):
            for ref in re.findall(r"%([\w.\-]+)", operands):
                done_index[ref] = i
    position = {name: i for i, (name, _, _) in enumerate(order)}
    summary, total_sent, trivial = {}, 0.0, 0
    for name, kind, is_async, operands, attrs in found:
        operand_bytes = sum(_type_bytes(shapes.get(ref, "")) for ref in re.findall(r"%([\w.\-]+)", operands))
        if operand_bytes == 0:  # operands printed with their types
            operand_bytes = _type_bytes(operands)
        p = _group_size(attrs, mesh_shape)
        if kind != "collective-permute" and p == 1:  # one participant: moves nothing (XLA GPU drops these)
            trivial += 1
            continue
        if kind == "collective-permute":
            pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
            n_pairs = len(re.findall(r"\{\d+,\d+", pairs.group(0))) if pairs else 1
            world = max(1, int(_prod(mesh_shape.values())))
            sent = operand_bytes * n_pairs / world  # averaged over the devices
        elif kind == "all-gather":
            sent = operand_bytes * (p - 1)
        elif kind == "all-reduce":
            sent = operand_bytes * 2 * (p - 1) / max(p, 1)
        else:  # all-to-all, reduce-scatter
            sent = operand_bytes * (p - 1) / max(p, 1)
        entry = summary.setdefault(kind, {"count": 0, "operand_bytes": 0, "sent_bytes_per_device": 0.0})
        entry["count"] += 1
        entry["operand_bytes"] += operand_bytes
        entry["sent_bytes_per_device"] += sent
        if is_async and name in done_index:
            between = done_index[name] - position[name] - 1
            entry.setdefault("instructions_between_start_and_done", []).append(between)
        total_sent += sent
    count = len(found) - trivial
    return {"by_kind": summary, "sent_bytes_per_device": total_sent, "count": count, "single_participant": trivial}


def _prod(xs):
    n = 1
    for x in xs:
        n *= x
    return n


# ------------------------------------------------------------------ collectives removed
@contextlib.contextmanager
def collectives_removed():
    """Swap jax.lax collectives for local stand-ins with the same shapes (while tracing only)."""
    import jax
    import jax.numpy as jnp

    lax = jax.lax
    saved = {n: getattr(lax, n) for n in ("ppermute", "all_gather", "all_to_all", "psum", "psum_scatter")}

    def ppermute(x, axis_name, perm, **_):
        return x

    def all_gather(x, axis_name, *, axis=0, tiled=False, **_):
        n = lax.axis_size(axis_name)
        return jnp.concatenate([x] * n, axis=axis) if tiled else jnp.stack([x] * n, axis=axis)

    def all_to_all(x, axis_name, split_axis, concat_axis, *, tiled=False, **_):
        n = lax.axis_size(axis_name)
        return jnp.concatenate(jnp.split(x, n, axis=split_axis), axis=concat_axis)

    def psum(x, axis_name, **_):
        return x

    def psum_scatter(x, axis_name, *, scatter_dimension=0, tiled=False, **_):
        n = lax.axis_size(axis_name)
        return jnp.split(x, n, axis=scatter_dimension)[0]

    stand_ins = dict(ppermute=ppermute, all_gather=all_gather, all_to_all=all_to_all, psum=psum)
    stand_ins["psum_scatter"] = psum_scatter
    try:
        for n, f in stand_ins.items():
            setattr(lax, n, f)
        yield
    finally:
        for n, f in saved.items():
            setattr(lax, n, f)


# ------------------------------------------------------------------------------ timing
def median_ms(fn, args, *, warmup, iters):
    """``benchmarks.timing.median_ms`` over ``iters`` samples of 5 back-to-back calls (dispatch amortised)."""
    return timing.median_ms(fn, *args, reps=iters, warmup=warmup, inner=5)


def profile_kernels(fn, args, path, *, calls: int = 3) -> dict:
    """Device time by kernel over ``calls`` runs of ``fn`` (a jax.profiler trace written under
    ``path``): ``{name: {"count", "ms_per_call"}}`` for the device-side events, plus the wall span of
    the device activity per call (``"span_ms_per_call"``: kernels and copies from first start to
    last end, per device stream). CPU-only runs have no device events and give an empty dict."""
    import gzip
    import pathlib

    import jax

    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(path, create_perfetto_trace=True):
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
    traces = sorted(pathlib.Path(path).rglob("perfetto_trace.json.gz"), key=os.path.getmtime)
    if not traces:
        return {}
    with gzip.open(traces[-1], "rb") as fp:
        events = json.load(fp).get("traceEvents", [])
    processes = {
        e["pid"]: str(e.get("args", {}).get("name"))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device_pids = {pid for pid, name in processes.items() if "/device:" in name}
    by_name, first, last = {}, {}, {}
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        name = re.sub(r"\s+", " ", str(e.get("name", "?")))[:80]
        entry = by_name.setdefault(name, {"count": 0, "us": 0.0})
        entry["count"] += 1
        entry["us"] += float(e.get("dur", 0.0))
        key = (e["pid"], e.get("tid"))
        first[key] = min(first.get(key, float("inf")), float(e["ts"]))
        last[key] = max(last.get(key, 0.0), float(e["ts"]) + float(e.get("dur", 0.0)))
    out = {n: {"count": v["count"] / calls, "ms_per_call": v["us"] / 1e3 / calls} for n, v in by_name.items()}
    spans = [(last[k] - first[k]) / 1e3 / calls for k in first]
    return {
        "kernels": out,
        "span_ms_per_call": max(spans, default=0.0),
        "trace": str(traces[-1]),
        "processes": sorted(processes.values()),
    }


def print_kernels(label, profile, top: int = 14):
    kernels = profile.get("kernels", {}) if profile else {}
    if not kernels:
        print(f"  {label}: no device events in the trace (processes: {(profile or {}).get('processes')})")
        return
    total = sum(v["ms_per_call"] for v in kernels.values())
    print(
        f"  {label}: device kernels per call (summed over devices and streams) {total:.3f} ms; "
        f"busiest stream spans {profile['span_ms_per_call']:.3f} ms per call (incl. gaps)"
    )
    for name, v in sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_call"])[:top]:
        print(f"    {v['ms_per_call']:8.3f} ms  ×{v['count']:<5g} {name}")


def memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        _setup_smoke_devices(args.devices)
    if args.latency_hiding and "latency_hiding_scheduler" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_latency_hiding_scheduler=true".strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lasp_jax import lasp_attention, make_mesh
    from pallas_kernels import linear_attention

    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    n = len(devices)
    dtype = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[args.dtype]
    b, h, d = args.batch, args.heads, args.dim
    hk, e = args.kv_heads or h, args.value_dim or d
    length = args.tokens_per_device
    t = length * n
    strategies = [s for s in args.strategies.split(",") if s]
    mesh = make_mesh(1, n, devices=devices)

    rng = np.random.default_rng(0)

    def draw(shape, scale=1.0):
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= scale
        return x

    host = {
        "q": draw((b, t, h, d)),
        "k": draw((b, t, hk, d), d**-0.5),
        "v": draw((b, t, hk, e)),
        "do": draw((b, t, h, e)),
    }
    decay_kw = {}
    if args.decay == "g_gamma":  # ALiBi-style slopes, as TransNormerLLM uses
        decay_kw["g_gamma"] = jnp.asarray(-(2.0 ** (-8.0 * np.arange(1, h + 1) / h)), jnp.float32)
    elif args.decay == "g":
        host["g"] = np.log(1 / (1 + np.exp(-(draw((b, t, h)) + 4.0)))).astype(np.float32)  # log-sigmoid, near 0
    elif args.decay == "channel":  # GLA's per-key-channel gates, logsigmoid(x) / 16
        host["g"] = (np.log(1 / (1 + np.exp(-draw((b, t, h, d))))) / 16).astype(np.float32)

    tokens = NamedSharding(mesh, P(None, "sp"))

    def on_host(name, x):  # converted on the host, so no device holds the whole sequence at once
        return x.astype(np.float32 if name == "g" else jnp.dtype(dtype))

    sharded = {name: jax.device_put(on_host(name, x), tokens) for name, x in host.items()}
    one = devices[0]
    local = {name: jax.device_put(on_host(name, x[:, :length]), one) for name, x in host.items()}

    def fwd_bwd(attention):
        # o is returned so no part of the forward can be dropped as dead code
        def run(q, k, v, do, g):
            o, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, g)[0], q, k, v)
            return o, pullback(do)

        return jax.jit(run)

    def fwd(attention):
        return jax.jit(lambda q, k, v, g: attention(q, k, v, g)[0])

    def single(q, k, v, g):
        return linear_attention(q, k, v, g=g, impl=args.impl, **decay_kw)

    def sharded_attention(strategy):
        def attention(q, k, v, g):
            return lasp_attention(q, k, v, g=g, mesh=mesh, strategy=strategy, impl=args.impl, **decay_kw)

        return attention

    def operands(arrays):
        return (arrays["q"], arrays["k"], arrays["v"], arrays["do"], arrays.get("g"))

    timing = dict(warmup=args.warmup, iters=args.iters)
    results = {
        "device": str(devices[0].device_kind),
        "platform": devices[0].platform,
        "num_devices": n,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "shape": {"batch": b, "tokens_per_device": length, "total_tokens": t, "heads": h, "kv_heads": hk}
        | {"dim": d, "value_dim": e, "dtype": args.dtype, "decay": args.decay, "impl": args.impl},
        "recorded_peers_ms": RECORDED_PEERS_MS,
        "strategies": {},
    }
    single_args = operands(local)
    single_fb = fwd_bwd(single)
    results["single_device"] = {
        "fwd_ms": median_ms(fwd(single), single_args[:3] + single_args[4:], **timing),
        "fwd_bwd_ms": median_ms(single_fb, single_args, **timing),
        "memory_bytes": memory_bytes(single_fb.lower(*single_args).compile()),
    }
    print(
        f"single device, local shape (B={b}, L={length}, H={h}, D={d}), {args.dtype}, decay={args.decay}: "
        f"fwd {results['single_device']['fwd_ms']:.3f} ms, fwd+bwd {results['single_device']['fwd_bwd_ms']:.3f} ms",
        flush=True,
    )
    # what one rank of LASP computes, without the collectives: the same kernel entered with a state
    # and returning the leaving one, both differentiated (the floor for ring and allgather)
    s0 = jax.device_put(jnp.asarray(draw((b, h, d, e), 0.1)), one)

    def single_with_states(q, k, v, do, g, s0, ds):
        def f(q, k, v, s0):
            return linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, impl=args.impl, **decay_kw)

        out, pullback = jax.vjp(f, q, k, v, s0)
        return out, pullback((do, ds))

    states_fb = jax.jit(single_with_states)
    results["single_device"]["with_states_fwd_bwd_ms"] = median_ms(states_fb, single_args + (s0, s0), **timing)
    print(
        f"single device with entering and leaving states (what one LASP rank computes, no collectives): "
        f"fwd+bwd {results['single_device']['with_states_fwd_bwd_ms']:.3f} ms",
        flush=True,
    )
    if args.profile:
        results["single_device"]["kernels"] = profile_kernels(
            states_fb, single_args + (s0, s0), os.path.join(args.profile, "single_with_states")
        )
        print_kernels("1 device with states", results["single_device"]["kernels"])

    sharded_args = operands(sharded)
    for strategy in strategies:
        row = {}
        try:
            attention = sharded_attention(strategy)
            fb = fwd_bwd(attention)
            compiled = fb.lower(*sharded_args).compile()
            row["collectives"] = hlo_collectives(compiled.as_text(), dict(mesh.shape))
            row["memory_bytes"] = memory_bytes(compiled)
            row["fwd_ms"] = median_ms(fwd(attention), sharded_args[:3] + sharded_args[4:], **timing)
            row["fwd_bwd_ms"] = median_ms(fb, sharded_args, **timing)
            row["ratio_to_single_device"] = row["fwd_bwd_ms"] / results["single_device"]["fwd_bwd_ms"]
            if not args.no_overlap:
                with collectives_removed():
                    fb_local = fwd_bwd(sharded_attention(strategy))
                    local_hlo = fb_local.lower(*sharded_args).compile().as_text()
                    row["no_comm_collectives"] = hlo_collectives(local_hlo, dict(mesh.shape))["count"]
                    row["no_comm_fwd_bwd_ms"] = median_ms(fb_local, sharded_args, **timing)
                row["exposed_comm_ms"] = row["fwd_bwd_ms"] - row["no_comm_fwd_bwd_ms"]
            if args.profile:
                row["kernels"] = profile_kernels(fb, sharded_args, os.path.join(args.profile, strategy))
                print_kernels(strategy, row["kernels"])
        except Exception as err:  # report and go on: one strategy's failure must not hide the others
            row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        results["strategies"][strategy] = row
        print(f"  {strategy}: " + (row.get("error") or f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms"), flush=True)

    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


def print_table(results):
    s = results["shape"]
    single = results["single_device"]
    print()
    print(
        f"{results['num_devices']} × {results['device']} ({results['platform']}), jax {results['jax']}: "
        f"B={s['batch']}, {s['tokens_per_device']} tokens per device (T={s['total_tokens']}), H={s['heads']}, "
        f"Hk={s['kv_heads']}, D={s['dim']}, E={s['value_dim']}, {s['dtype']}, decay={s['decay']}, impl={s['impl']}"
    )
    head = (
        f"| {'strategy':<14} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | {'× 1 device':>10} | {'no-comm ms':>10} | "
        f"{'exposed comm ms':>15} | {'sent MB/device':>14} | {'collectives':>11} | {'memory GB':>9} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    print(
        f"| {'1 device':<14} | {single['fwd_ms']:>8.3f} | {single['fwd_bwd_ms']:>10.3f} | {1.0:>10.2f} | {'':>10} | "
        f"{'':>15} | {0.0:>14.3f} | {0:>11} | {_gb(single['memory_bytes']):>9} |"
    )
    if "with_states_fwd_bwd_ms" in single:
        ws = single["with_states_fwd_bwd_ms"]
        print(
            f"| {'1 dev + states':<14} | {'':>8} | {ws:>10.3f} | {ws / single['fwd_bwd_ms']:>10.2f} | {'':>10} | "
            f"{'':>15} | {0.0:>14.3f} | {0:>11} | {'':>9} |"
        )
    for name, row in results["strategies"].items():
        if "error" in row:
            print(f"| {name:<14} | {row['error'][:100]}")
            continue
        nc = row.get("no_comm_fwd_bwd_ms")
        ex = row.get("exposed_comm_ms")
        print(
            f"| {name:<14} | {row['fwd_ms']:>8.3f} | {row['fwd_bwd_ms']:>10.3f} | "
            f"{row['ratio_to_single_device']:>10.2f} | {'' if nc is None else f'{nc:.3f}':>10} | "
            f"{'' if ex is None else f'{ex:.3f}':>15} | {row['collectives']['sent_bytes_per_device'] / 1e6:>14.3f} | "
            f"{row['collectives']['count']:>11} | {_gb(row['memory_bytes']):>9} |"
        )
    best = [r["fwd_bwd_ms"] for r in results["strategies"].values() if "fwd_bwd_ms" in r]
    if best and results["platform"] == "gpu":
        for peer, ms in results["recorded_peers_ms"].items():
            speedup = ms / min(best)
            print(f"recorded peer (2×H200, not re-measured): {peer} {ms} ms; fastest here {speedup:.1f}× faster")


def _gb(x):
    return "" if x is None else f"{x / 2**30:.3f}"


if __name__ == "__main__":
    main(sys.argv[1:])
