"""Sequence parallelism from 2 to 1024 GPUs: collectives read from compiled HLO, a cost model, its check.

Three parts (notes/lasp.md, "The log-depth scan and the scaling model"):

(a) ``--hlo 8,16,64,128,256``: for each P, a subprocess with P fake CPU devices compiles forward +
    backward of ``lasp_attention`` (g_gamma; and with ``--families``, per-token g and the Gated
    DeltaNet rule) for every state strategy at tiny local shapes and reads from the HLO the
    collectives, their bytes and the bytes the busiest rank sends, beside the expected counts
    (ring 2(P−1) hops, allgather 2 gathers of P states, scan 2⌈log2 P⌉ rounds).
(b) the cost model: per layer, forward + backward at 32K tokens per GPU,

        time(P) = local kernel (one GPU entering and leaving with a state, measured)
                  + exposed communication (every state collective sits on the critical path:
                    the forward's between the kernel's first stage and its state scan, the
                    backward's between dq and the reverse scan; notes/lasp.md)

    ring: 2(P−1) dependent hops of one state; allgather: 2 all-gathers of P states (a ring of
    P−1 steps) and a float32 prefix over P states read from HBM; scan: 2⌈log2 P⌉ rounds of one
    state (plus its decay with per-token g). Point-to-point and all-gather latency/bandwidth
    inside a node are fitted to ``--collectives`` (the JSON that ``--measure-collectives`` writes
    on the real GPUs; without it, stated NVLink figures); across nodes, stated figures
    (``INTER_NODE``: 400 Gb/s InfiniBand per GPU, 5 µs per message, 8 GPUs per node).
(c) ``--check sp.json ...``: the model against measured rows of benchmarks/sequence_parallel.py
    (its local time from each file's "1 dev + states" row), and ``--plot docs/scaling.png``.

    python benchmarks/scaling.py --hlo 8,16,64,128,256 --json hlo.json              # CPU
    python benchmarks/scaling.py --measure-collectives --json collectives.json       # on the GPUs
    python benchmarks/scaling.py --collectives collectives.json \\
        --check benchmarks/results/2026-11-22_2xH200_s3/sp.json benchmarks/results/2026-11-22_4xH200_s3/sp.json \\
        --plot docs/scaling.png --json model.json
    python benchmarks/scaling.py --smoke                                             # CI: P = 4 fake devices
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import timing  # noqa: E402  (imports nothing heavy: jax initialises later)

STATE_STRATEGIES = ("ring", "allgather", "scan")
# local shapes of the HLO part: tiny, the collectives do not depend on them (bytes scale with B·H·D·E)
HLO_SHAPE = {"b": 1, "tokens_per_device": 16, "h": 2, "d": 8}
# the workload of the model (DESIGN §5): B=1, H=16, D=E=128, float32 state, 32K tokens per GPU
MODEL_SHAPE = {"b": 1, "h": 16, "d": 128, "e": 128, "tokens_per_device": 32768}
MODEL_SIZES = tuple(2**k for k in range(1, 11))  # P = 2 … 1024
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _load_sequence_parallel():
    path = os.path.join(ROOT, "benchmarks", "sequence_parallel.py")
    spec = importlib.util.spec_from_file_location("sequence_parallel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------- (a) HLO collectives
def rounds(size: int) -> int:
    """``⌈log2 P⌉`` (the scan's rounds per direction)."""
    return (size - 1).bit_length()


def expected_collectives(strategy: str, size: int, *, state_bytes: int, phi_bytes: int, shared_phi: bool) -> dict:
    """What forward + backward should compile to (no final state asked for): collective count,
    operand bytes summed over them, and the bytes the busiest rank sends (ring all-gather: P−1 times
    its operand). ``phi_bytes``: one rank's transition (log Γ ``[B, H]`` or Φ ``[B, Hv, D, D]``),
    sent beside the state when it differs per rank (``shared_phi`` False)."""
    phi = 0 if shared_phi else phi_bytes
    if strategy == "allgather":  # forward: (Φ_r, M_r) of every rank; backward: every dS_in^loc
        operand = 2 * state_bytes + phi
        return {"count": 2, "operand_bytes": operand, "max_rank_bytes": (size - 1) * operand}
    # point-to-point: (offset, bytes) of each hop or round per direction; rank r sends forward
    # when r + offset < P and backward when r − offset ≥ 0
    if strategy == "ring":
        hops = [(1, state_bytes)] * (size - 1)  # hop i has the single pair (i, i + 1)
        sends = [state_bytes * ((r < size - 1) + (r > 0)) for r in range(size)]
    else:  # scan: every round but the last sends (Φ, M); the last M alone
        k = rounds(size)
        hops = [(2**i, state_bytes + (phi if i < k - 1 else 0)) for i in range(k)]
        sends = [sum(n * ((r + d < size) + (r - d >= 0)) for d, n in hops) for r in range(size)]
    return {"count": 2 * len(hops), "operand_bytes": 2 * sum(n for _, n in hops), "max_rank_bytes": max(sends)}


_PAIRS = re.compile(r"source_target_pairs=\{(.*?)\}\}")


def max_rank_bytes(hlo_text: str, summary: dict, world: int) -> float:
    """Bytes the busiest rank sends: per collective-permute, the operand times its pairs with that
    rank as source; per all-gather (ring algorithm), (P−1) times the operand; others as averaged."""
    sp = _load_sequence_parallel()
    sends = [0.0] * world
    shapes = {}
    for line in hlo_text.splitlines():
        m = sp._INSTR.match(line)
        if not m:
            continue
        name, type_text, op, operands, attrs = m.groups()
        shapes[name] = type_text
        if op.removesuffix("-start") != "collective-permute" or op.endswith("-done"):
            continue
        refs = re.findall(r"%([\w.\-]+)", operands)
        nbytes = sum(sp._type_bytes(shapes.get(r, "")) for r in refs) or sp._type_bytes(operands)
        pairs = _PAIRS.search(attrs)
        for source in re.findall(r"\{(\d+),\d+", pairs.group(0) if pairs else ""):
            sends[int(source)] += nbytes
    others = sum(v["sent_bytes_per_device"] for k, v in summary["by_kind"].items() if k != "collective-permute")
    return max(sends) + others


def _compile_fwd_bwd(family: str, strategy: str, mesh, size: int):
    """The compiled HLO text of forward + backward of one layer on the mesh (impl="xla")."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lasp_jax import lasp_attention, lasp_gated_delta_rule

    b, length, h, d = (HLO_SHAPE[n] for n in ("b", "tokens_per_device", "h", "d"))
    t = length * size
    tokens = NamedSharding(mesh, P(None, "sp"))
    x = jax.device_put(jnp.ones((b, t, h, d), jnp.float32), tokens)
    per_token = jax.device_put(jnp.full((b, t, h), -0.1, jnp.float32), tokens)
    if family == "delta_rule":
        layer = lambda q, k, v, g: lasp_gated_delta_rule(  # noqa: E731
            q, k, v, jax.nn.sigmoid(g), g=g, mesh=mesh, strategy=strategy, impl="xla"
        )
    else:
        g_gamma = jnp.full((h,), -0.1) if family == "g_gamma" else None
        layer = lambda q, k, v, g: lasp_attention(  # noqa: E731
            q, k, v, g=g if family == "g" else None, g_gamma=g_gamma, mesh=mesh, strategy=strategy, impl="xla"
        )

    def fwd_bwd(q, k, v, g):
        o, pullback = jax.vjp(lambda q, k, v, g: layer(q, k, v, g)[0], q, k, v, g)
        return o, pullback(jnp.ones_like(o))

    # XLA's cheap backend level: the collectives are fixed before code generation, which is the cost here
    return jax.jit(fwd_bwd, compiler_options=FAST_COMPILE).lower(x, x, x, per_token).compile().as_text()


def hlo_worker(size: int, families, strategies=STATE_STRATEGIES) -> dict:
    """(a) for one P, in this process (which must have at least P devices)."""
    import jax

    from lasp_jax import make_mesh

    sp = _load_sequence_parallel()
    if jax.device_count() < size:
        raise RuntimeError(f"the HLO worker for P={size} found {jax.device_count()} devices")
    mesh = make_mesh(1, size, devices=jax.devices()[:size])
    b, h, d = HLO_SHAPE["b"], HLO_SHAPE["h"], HLO_SHAPE["d"]
    state_bytes = b * h * d * d * 4
    rows = []
    for family in families:
        phi_bytes = b * h * (d * d if family == "delta_rule" else 1) * 4
        shared = family == "g_gamma"
        for strategy in strategies:
            hlo = _compile_fwd_bwd(family, strategy, mesh, size)
            summary = sp.hlo_collectives(hlo, dict(mesh.shape))
            rows.append(
                {
                    "P": size,
                    "family": family,
                    "strategy": strategy,
                    "count": summary["count"],
                    "by_kind": {k: v["count"] for k, v in summary["by_kind"].items()},
                    "operand_bytes": sum(v["operand_bytes"] for v in summary["by_kind"].values()),
                    "mean_rank_bytes": summary["sent_bytes_per_device"],
                    "max_rank_bytes": max_rank_bytes(hlo, summary, size),
                    "state_bytes": state_bytes,
                    "expected": expected_collectives(
                        strategy, size, state_bytes=state_bytes, phi_bytes=phi_bytes, shared_phi=shared
                    ),
                }
            )
    return {"P": size, "rows": rows}


def run_hlo(sizes, families, strategies=STATE_STRATEGIES, *, timeout=1800) -> list[dict]:
    """(a): a subprocess per P with P fake CPU devices (the device count is fixed at jax's start)."""
    rows = []
    for size in sizes:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={size}".strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--hlo-worker", str(size)]
        cmd += ["--families", ",".join(families), "--strategies", ",".join(strategies)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"HLO worker for P={size} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows += result["rows"]
        for row in result["rows"]:
            print(_hlo_line(row), flush=True)
    return rows


def _hlo_line(row) -> str:
    exp = row["expected"]
    ok = row["count"] == exp["count"] and row["max_rank_bytes"] == exp["max_rank_bytes"]
    return (
        f"P={row['P']:>4} {row['family']:<10} {row['strategy']:<9} collectives {row['count']:>4} "
        f"(expected {exp['count']:>4}), busiest rank sends {row['max_rank_bytes'] / row['state_bytes']:7.2f} states "
        f"(expected {exp['max_rank_bytes'] / row['state_bytes']:7.2f}){'' if ok else '  MISMATCH'}"
    )


# ----------------------------------------------------------------------------- (b) cost model
@dataclasses.dataclass(frozen=True)
class Link:
    """``time(bytes) = latency + bytes / bandwidth``."""

    latency_us: float
    bandwidth_gbps: float  # GB/s (1e9 bytes)
    source: str

    def seconds(self, nbytes: float) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbps * 1e9)


# stated figures, used where nothing measured is given: NVLink 4 on H200 (NVSwitch, ~450 GB/s per
# direction per GPU; ~15 µs per collective as XLA launches NCCL), and a multi-node network of
# 400 Gb/s InfiniBand NDR per GPU (50 GB/s) with ~5 µs per message, 8 GPUs per node
NVLINK_STATED = Link(15.0, 450.0, "stated: NVLink 4 (H200), 450 GB/s, 15 us per NCCL call")
INTER_NODE = Link(5.0, 50.0, "stated: 400 Gb/s InfiniBand NDR per GPU, 5 us per message")
GPUS_PER_NODE = 8
HBM_GBPS = 4800.0  # H200 HBM3e, the allgather's prefix reads P states
SCAN_ROUND_STATE_PASSES = 3  # per round: read M, read the received M, write (apply + add)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Exposed communication of one layer's forward + backward, per strategy (seconds)."""

    ppermute: Link  # one point-to-point hop inside a node
    all_gather: Link  # per step of a ring all-gather inside a node: latency once, (P−1)·bytes/bandwidth
    inter_node: Link = INTER_NODE
    gpus_per_node: int = GPUS_PER_NODE

    def _hop(self, nbytes, crosses_node: bool) -> float:
        return (self.inter_node if crosses_node else self.ppermute).seconds(nbytes)

    def ring(self, size, state_bytes, phi_bytes=0) -> float:
        crossing = max(0, math.ceil(size / self.gpus_per_node) - 1)  # node edges along the rank order
        return 2 * (crossing * self._hop(state_bytes, True) + (size - 1 - crossing) * self._hop(state_bytes, False))

    def allgather(self, size, state_bytes, phi_bytes=0) -> float:
        gathered = state_bytes + phi_bytes
        if size <= self.gpus_per_node:
            gather = self.all_gather.seconds((size - 1) * gathered)
        else:  # NCCL's ring over nodes: every step waits on the slowest (inter-node) edge
            gather = self.all_gather.latency_us * 1e-6 + (size - 1) * self.inter_node.seconds(gathered)
        prefix = size * gathered / (HBM_GBPS * 1e9)
        return 2 * (gather + prefix)

    def scan(self, size, state_bytes, phi_bytes=0) -> float:
        total, k = 0.0, rounds(size)
        for i in range(k):  # every round but the last sends (Φ, M), the last M alone
            nbytes = state_bytes + (phi_bytes if i < k - 1 else 0)
            crosses = size > self.gpus_per_node  # some pair of every round crosses a node edge
            local = SCAN_ROUND_STATE_PASSES * state_bytes / (HBM_GBPS * 1e9)
            total += self._hop(nbytes, crosses) + local
        return 2 * total

    def exposed(self, strategy, size, state_bytes, phi_bytes=0) -> float:
        return getattr(self, strategy)(size, state_bytes, phi_bytes)


def fit_link(points, source) -> Link:
    """Least-squares ``t = a + n / b`` over ``(bytes, seconds)`` points (one point: the stated
    bandwidth's latency is fitted alone)."""
    if len(points) == 1:
        n, t = points[0]
        return Link(max(t - n / (NVLINK_STATED.bandwidth_gbps * 1e9), 0.0) * 1e6, NVLINK_STATED.bandwidth_gbps, source)
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    var = sum((n - mean_n) ** 2 for n, _ in points)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / var
    latency = mean_t - slope * mean_n
    bandwidth = 1.0 / slope / 1e9 if slope > 0 else float("inf")
    return Link(max(latency, 0.0) * 1e6, bandwidth, source)


def model_from_collectives(measured: dict | None) -> CostModel:
    """Fit the intra-node links to ``--measure-collectives`` output (or the stated NVLink figures)."""
    if not measured:
        return CostModel(ppermute=NVLINK_STATED, all_gather=NVLINK_STATED)
    where = f"fitted to {measured.get('device', '?')} × {measured.get('num_devices', '?')} measurements"
    pp = [(r["bytes"], r["ms"] / 1e3) for r in measured["rows"] if r["op"] == "ppermute"]
    ag = [((r["P"] - 1) * r["bytes"], r["ms"] / 1e3) for r in measured["rows"] if r["op"] == "all_gather"]
    return CostModel(
        ppermute=fit_link(pp, f"ppermute {where}") if pp else NVLINK_STATED,
        all_gather=fit_link(ag, f"all_gather {where}") if ag else NVLINK_STATED,
    )


def model_state_bytes(shape=MODEL_SHAPE) -> tuple[int, int]:
    """(state bytes, per-rank log-decay bytes) of the model's workload."""
    return shape["b"] * shape["h"] * shape["d"] * shape["e"] * 4, shape["b"] * shape["h"] * 4


def predict(model: CostModel, local_ms: float, sizes=MODEL_SIZES, *, per_token_decay=False) -> list[dict]:
    """(b): fwd+bwd per layer and its exposed communication for each strategy and P."""
    state, phi = model_state_bytes()
    phi = phi if per_token_decay else 0
    rows = []
    for size in sizes:
        for strategy in STATE_STRATEGIES:
            comm_ms = 1e3 * model.exposed(strategy, size, state, phi)
            rows.append({"P": size, "strategy": strategy, "exposed_comm_ms": comm_ms, "fwd_bwd_ms": local_ms + comm_ms})
    return rows


# ---------------------------------------------------------------------------------- (c) check
def check_rows(model: CostModel, paths) -> list[dict]:
    """The model against measured benchmarks/sequence_parallel.py rows (ring/allgather/scan)."""
    out = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        size = run["num_devices"]
        shape = run["shape"]
        local_ms = run["single_device"].get("with_states_fwd_bwd_ms", run["single_device"]["fwd_bwd_ms"])
        state = shape["batch"] * shape["heads"] * shape["dim"] * shape["value_dim"] * 4
        phi = shape["batch"] * shape["heads"] * 4 if shape["decay"] == "g" else 0
        for strategy, row in run["strategies"].items():
            if strategy not in STATE_STRATEGIES or "fwd_bwd_ms" not in row:
                continue
            predicted = local_ms + 1e3 * model.exposed(strategy, size, state, phi)
            out.append(
                {
                    "file": os.path.relpath(path, ROOT),
                    "P": size,
                    "strategy": strategy,
                    "measured_ms": row["fwd_bwd_ms"],
                    "predicted_ms": predicted,
                    "error": predicted / row["fwd_bwd_ms"] - 1,
                    "measured_exposed_ms": row.get("exposed_comm_ms"),
                    "predicted_exposed_ms": predicted - local_ms,
                }
            )
    return out


def plot(rows, path, *, local_ms, model: CostModel, checked=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy, marker in zip(STATE_STRATEGIES, "os^"):
        mine = [r for r in rows if r["strategy"] == strategy]
        sizes = [r["P"] for r in mine]
        left.plot(sizes, [r["fwd_bwd_ms"] for r in mine], marker=marker, label=strategy)
        right.plot(sizes, [r["exposed_comm_ms"] for r in mine], marker=marker, label=strategy)
    for r in checked:
        left.scatter([r["P"]], [r["measured_ms"]], color="black", marker="x", zorder=5)
    left.axhline(local_ms, color="grey", linestyle=":", label="local kernel (1 GPU with states)")
    if checked:
        left.scatter([], [], color="black", marker="x", label="measured (H200)")
    for ax, title in ((left, "fwd+bwd per layer (ms)"), (right, "exposed communication (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs on the sequence axis (P)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.axvline(GPUS_PER_NODE, color="grey", alpha=0.4)
    left.legend(fontsize=8)
    shape = MODEL_SHAPE
    fig.suptitle(
        f"Predicted LASP layer time, {shape['tokens_per_device'] // 1024}K tokens/GPU, B={shape['b']}, "
        f"H={shape['h']}, D=E={shape['d']} (fp32 state), {GPUS_PER_NODE} GPUs per node\n"
        f"intra-node: {model.ppermute.source}; inter-node: {model.inter_node.source}",
        fontsize=8,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------- measuring collectives (GPU)
def measure_collectives(sizes_mib=(0.25, 1.0, 4.0), chain=16, reps=20, ranks=(2, 4, 8, 16, 32, 64)) -> dict:
    """Time ``ppermute`` (one hop r → r+1 on every rank) and ``all_gather`` of a float32 array of each
    size on the real devices, for P = 2, 4, … up to the device count. A program of ``chain``
    dependent collectives and one of a single collective are timed; their difference divided by
    ``chain − 1`` is the time per collective without the dispatch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    rows = []
    for size in [p for p in ranks if p <= n]:
        mesh = Mesh(np.array(jax.devices()[:size]), ("sp",))
        for mib in sizes_mib:
            elems = int(mib * 2**20 / 4)
            x = jax.device_put(jnp.ones((size, elems), jnp.float32), NamedSharding(mesh, P("sp")))
            for op in ("ppermute", "all_gather"):
                per_call = {}
                for count in (1, chain):
                    fn = jax.jit(
                        jax.shard_map(
                            functools.partial(_chained, op=op, count=count, size=size),
                            mesh=mesh,
                            in_specs=P("sp"),
                            out_specs=P("sp"),
                        )
                    )
                    per_call[count] = timing.median_ms(fn, x, reps=reps, warmup=3)
                ms = (per_call[chain] - per_call[1]) / (chain - 1)
                rows.append({"op": op, "P": size, "bytes": elems * 4, "ms": ms, "single_call_ms": per_call[1]})
                print(json.dumps(rows[-1]), flush=True)
    device = jax.devices()[0]
    return {"device": device.device_kind, "num_devices": n, "jax": jax.__version__, "rows": rows}


def _chained(x, op, count, size):
    import jax

    for _ in range(count):
        if op == "ppermute":
            x = jax.lax.ppermute(x, "sp", perm=[(r, (r + 1) % size) for r in range(size)])
        else:  # keep the next gather dependent on this one and the array its size
            gathered = jax.lax.all_gather(x, "sp", tiled=True)
            x = gathered[1:2] * 0.5 + gathered[:1] * 0.5
    return x


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hlo", default=None, help="comma-separated P for part (a), e.g. 8,16,64,128,256")
    p.add_argument("--families", default="g_gamma", help="for (a): g_gamma, g, delta_rule (comma-separated)")
    p.add_argument("--strategies", default=",".join(STATE_STRATEGIES), help="for (a)")
    p.add_argument("--hlo-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure-collectives", action="store_true", help="time ppermute/all_gather on the devices")
    p.add_argument("--collectives", default=None, help="JSON written by --measure-collectives (fits the model)")
    p.add_argument("--local-ms", type=float, default=None, help="one GPU's fwd+bwd with states (default: --check)")
    p.add_argument("--check", nargs="*", default=[], help="benchmarks/sequence_parallel.py JSON files")
    p.add_argument("--plot", default=None, help="write the PNG plot here")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="CI: (a) at P = 4 (unless --hlo) and the model")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    strategies = [s for s in args.strategies.split(",") if s]
    if args.hlo_worker is not None:
        print(json.dumps(hlo_worker(args.hlo_worker, families, strategies)))
        return {}
    if args.measure_collectives:
        results = measure_collectives()
        _write(args.json, results)
        return results
    results = {}
    sizes = [int(s) for s in (args.hlo or ("4" if args.smoke else "")).split(",") if s]
    if sizes:
        results["hlo"] = run_hlo(sizes, families, strategies)
    measured = None
    if args.collectives:
        with open(args.collectives) as f:
            measured = json.load(f)
    model = model_from_collectives(measured)
    results["links"] = {n: dataclasses.asdict(getattr(model, n)) for n in ("ppermute", "all_gather", "inter_node")}
    checked = check_rows(model, args.check)
    local_ms = args.local_ms or _local_ms_from(args.check) or 1.676
    results["local_ms"] = local_ms
    results["predicted"] = predict(model, local_ms)
    results["checked"] = checked
    print_model(results)
    if args.plot:
        plot(results["predicted"], args.plot, local_ms=local_ms, model=model, checked=checked)
        print(f"wrote {args.plot}")
    _write(args.json, results)
    return results


def _local_ms_from(paths):
    for path in paths:
        with open(path) as f:
            single = json.load(f)["single_device"]
        if "with_states_fwd_bwd_ms" in single:
            return single["with_states_fwd_bwd_ms"]
    return None


def print_model(results):
    for name, v in results["links"].items():
        print(f"{name}: {v['latency_us']:.1f} us + bytes / {v['bandwidth_gbps']:.0f} GB/s ({v['source']})")
    print(f"predicted fwd+bwd per layer (ms), local kernel {results['local_ms']:.3f} ms, exposed comm in brackets")
    print("| P | " + " | ".join(STATE_STRATEGIES) + " | scan / min(ring, allgather) comm |")
    print("|---|" + "---|" * (len(STATE_STRATEGIES) + 1))
    by_p = {}
    for r in results["predicted"]:
        by_p.setdefault(r["P"], {})[r["strategy"]] = r
    for size, row in by_p.items():
        cells = " | ".join(f"{row[s]['fwd_bwd_ms']:.3f} ({row[s]['exposed_comm_ms']:.3f})" for s in STATE_STRATEGIES)
        best_other = min(row["ring"]["exposed_comm_ms"], row["allgather"]["exposed_comm_ms"])
        ratio = row["scan"]["exposed_comm_ms"] / best_other
        print(f"| {size} | {cells} | {ratio:.2f} |")
    if results["checked"]:
        print("\ncheck against measured rows")
        print("| file | P | strategy | measured ms | predicted ms | error | measured exposed | predicted exposed |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["checked"]:
            exposed = r["measured_exposed_ms"]
            print(
                f"| {r['file']} | {r['P']} | {r['strategy']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
                f"{100 * r['error']:+.1f}% | {'' if exposed is None else f'{exposed:.3f}'} | "
                f"{r['predicted_exposed_ms']:.3f} |"
            )


def _write(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
