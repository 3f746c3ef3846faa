"""Every collective of the sequence-parallel training step: kind, dtype, shape, bytes, count, phase and schedule.

The step is the one ``benchmarks/train_step.py`` times (its ``build_trainer``; every train_step flag
works here: ``--preset``, ``--remat``, ``--split-projections``, ``--strategy``, ``--impl``,
``--loss-chunks``, ``--fsdp``, ...), lowered on abstract inputs (``memory_report.abstract_step_inputs``)
and compiled for ``--sp`` devices, never run. On a CPU (8 fake devices by default) a shallow model
(``--layers``, default 1 and 2) at ``--tokens`` tokens per device compiles in seconds; the table is
then extrapolated to the preset's depth and ``--tokens-per-device`` (default 32768): a collective
whose count grows with the depth is per layer, a dimension equal to a token count scales with it.
The loss keeps the chunk count of the target length (``train_step.loss_chunks_for``), so a
collective inside the loss loop runs as often as it would there.

Two views of the same step:

- **the program** (the module right after SPMD partitioning: what the partitioner asks for, before
  any backend pass combines, promotes, moves or schedules collectives; the same on every backend):
  one row per (kind, dtype, shape, mesh axes, phase, role), its count at the preset's depth, its
  bytes at the target length, its executions per step (a collective inside the loss loop runs once
  per chunk) and, for each collective of the step's top level, the backward matmuls that neither
  feed it nor wait for it (the work a latency-hiding scheduler could hide it behind);
- **the compiled step** (the backend's optimized module, at the compiled depth and length): the
  collectives as they run (combined, dtype-promoted, async ``-start``/``-done`` pairs on a GPU),
  their place in the schedule, the backward matmuls scheduled after each one (after the last of
  them nothing is left to hide it), and for async pairs the matmuls between start and done.

Phase: ``backward`` when the op's name holds ``transpose(`` (autodiff's backward), else ``forward``
(the loss's own gradient products run in the forward pass: ``models.loss``). Role: ``param grad``
(the shape of a parameter), ``grad slice`` (a parameter gradient's all-reduce whose users are all
dynamic-slices: ZeRO-1's reduction, ``--shard-optimizer-over-data``, which XLA GPU's
``ReduceScatterCreator`` makes a reduce-scatter), ``params`` (an all-gather whose result has a
parameter's shape: ZeRO-1's gather of the updated parameters), ``activation`` (a token dimension),
``state`` (the LASP ring's ``[B, H, D, E]``), ``scalar``. ``degenerate``: a group of one device
(a copy, not a transfer).
Bytes are the operands' (for an all-gather the local part); ``wire`` is what each device sends
(all-reduce 2(n−1)/n·bytes, all-gather (n−1)·bytes, reduce-scatter (n−1)/n·bytes, permute bytes)
and ``ms`` that over ``--link-gbps`` (an estimate; 2×H200 NVLink ~360 GB/s bus bandwidth in NCCL's
all-reduce tests). On a GPU (``JAX_PLATFORMS=cuda``, two devices) the compiled view is the GPU's
own schedule (``XLA_FLAGS`` apply: compare ``--xla_gpu_enable_latency_hiding_scheduler=true``).

    python benchmarks/sp_collectives.py --preset tnl-1b --remat none --split-projections       # CPU
    python benchmarks/sp_collectives.py --preset tnl-1b --remat none --split-projections --layers 2 \\
        --tokens 32768 --json gpu_collectives.json     # on 2 GPUs: the GPU's compiled schedule
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "collective-broadcast")
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "s8": 1, "u8": 1}
MATMUL_OPS = ("dot", "convolution")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_HEAD = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="other flags go to train_step.py")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="depths compiled (two: per-layer counts)")
    p.add_argument("--tokens", type=int, default=3072, help="tokens per device compiled (no model dimension)")
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel size")
    p.add_argument("--target-layers", type=int, default=0, help="depth of the extrapolated table (0: the preset's)")
    p.add_argument("--link-gbps", type=float, default=360.0, help="per-device bus bandwidth of the ms estimate")
    p.add_argument("--dump", default=None, help="keep XLA's dumps here (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args, rest = p.parse_known_args(argv)
    if len(args.layers) > 2:
        p.error("--layers takes one or two depths")
    return args, rest


# ---- one HLO module as text ---------------------------------------------------------------------


@dataclass
class Instr:
    name: str
    computation: str
    index: int  # position in its computation (the schedule, in a scheduled module)
    shape: str
    opcode: str
    operands: list[str]
    called: list[str]
    op_name: str
    text: str


class HloModule:
    """Instructions, computations (in textual = schedule order), call edges and loop trip counts."""

    def __init__(self, text: str):
        self.instr: dict[str, Instr] = {}
        self.computations: dict[str, list[str]] = defaultdict(list)
        self.entry = None
        computation = None
        for line in text.splitlines():
            head = _HEAD.match(line)
            if head and not line.startswith(" "):
                computation = head.group(1)
                if line.startswith("ENTRY"):
                    self.entry = computation
                continue
            m = _INSTR.match(line)
            if not m or computation is None:
                continue
            name, shape, opcode, rest = m.groups()
            args = rest.split("), ", 1)[0] if "), " in rest else rest.rsplit(")", 1)[0]
            called = re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)", rest)
            called += re.findall(r"calls=\{([^}]*)\}", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            instr = Instr(
                name=name,
                computation=computation,
                index=len(self.computations[computation]),
                shape=shape,
                opcode=opcode,
                operands=re.findall(r"%([\w.\-]+)", args),
                called=[c.strip().lstrip("%") for c in ",".join(called).split(",") if c.strip()],
                op_name=op_name.group(1) if op_name else "",
                text=line,
            )
            self.instr[name] = instr
            self.computations[computation].append(name)
        self.trips = self._trip_counts()
        self._matmuls: dict[str, int] = {}

    def _trip_counts(self) -> dict[str, int]:
        """Loop body -> known trip count (from the while's backend config; 1 when unknown)."""
        trips = {}
        for i in self.instr.values():
            if i.opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", i.text)
                n = re.search(r"known_trip_count[^0-9]*(\d+)", i.text)
                if body:
                    trips[body.group(1)] = int(n.group(1)) if n else 0
        return trips

    def executions(self, computation: str) -> int:
        """How often one run of the module runs ``computation`` (product of the enclosing loops' trips)."""
        callers = [i for i in self.instr.values() if computation in i.called]
        if not callers:
            return 1
        caller = callers[0]
        own = self.trips.get(computation, 1) if caller.opcode == "while" else 1
        return max(own, 1) * self.executions(caller.computation)

    def operand_arrays(self, ref: str) -> list[tuple[str, tuple[int, ...]]]:
        """The arrays of an operand reference: ``name``, or ``name#k`` (element k of a flat tuple)."""
        name, _, index = ref.partition("#")
        if name not in self.instr:
            return []
        parts = arrays(self.instr[name].shape)
        return [parts[int(index)]] if index and int(index) < len(parts) else parts

    def context(self, name: str) -> str:
        """The op names of an instruction and of the calls that run its computation (a shard_map body's
        ops carry bare names such as ``psum``; the call of the body says whether it is the backward)."""
        i = self.instr[name]
        callers = [c for c in self.instr.values() if i.computation in c.called]
        return i.op_name + (" < " + self.context(callers[0].name) if callers else "")

    def backward_matmuls(self, name: str) -> int:
        """Backward matmuls an instruction runs (a dot itself, or those inside what it calls, loops counted)."""
        if name in self._matmuls:
            return self._matmuls[name]
        i = self.instr[name]
        count = self._inner_dot(name, self.context(name))
        if i.opcode == "custom-call" and "transpose(" in i.op_name and re.search(r"gemm|matmul|pallas|triton", i.text):
            count += 1
        self._matmuls[name] = count
        return count

    def _inner_dot(self, name: str, outer_op_name: str) -> int:
        i = self.instr[name]
        context = f"{outer_op_name} {i.op_name}"
        own = int(i.opcode in MATMUL_OPS and "transpose(" in context)
        inner = 0
        for c in i.called:
            n = sum(self._inner_dot(n, context) for n in self.computations.get(c, ()))
            inner += n * (max(self.trips.get(c, 1), 1) if i.opcode == "while" else 1)
        return own + inner

    def ancestors(self, name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            for o in self.instr[todo.pop()].operands:
                if o in self.instr and o not in seen:
                    seen.add(o)
                    todo.append(o)
        return seen

    def descendants(self, name: str) -> set[str]:
        users = self._users()
        seen, todo = set(), [name]
        while todo:
            for u in users.get(todo.pop(), ()):
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        return seen

    def _users(self):
        if not hasattr(self, "_user_map"):
            self._user_map = defaultdict(list)
            for i in self.instr.values():
                for o in i.operands:
                    self._user_map[o].append(i.name)
        return self._user_map


# ---- collectives --------------------------------------------------------------------------------


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(x) for x in dims.split(",") if x)) for dt, dims in _ARRAY.findall(shape)]


def array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return DTYPE_BYTES.get(dtype, 1 if dtype == "pred" else 4) * math.prod(dims)


def group(text: str) -> tuple[str, int]:
    """(mesh axes or pairs, devices per group) of a collective's replica groups."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
    if mesh:
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))}
        axes = re.findall(r"'(\w+)'", mesh.group(2))
        return ",".join(axes), math.prod(sizes.get(a, 1) for a in axes)
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", text)
    if pairs:
        n = len(re.findall(r"\{\d+,\d+\}", text.split("source_target_pairs=", 1)[1].split("}}", 1)[0] + "}"))
        return f"{n} pairs", 2 if n else 1
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", text)
    if iota:
        return "iota", int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", text)
    if explicit:
        return "groups", len(explicit.group(1).split(","))
    return "all", 0


def wire_factor(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "all-gather": n - 1, "reduce-scatter": (n - 1) / n}.get(kind, 1.0)


@dataclass
class Collective:
    name: str
    kind: str
    dtype: str
    shape: str
    bytes: int
    axes: str
    group_size: int
    phase: str
    role: str
    computation: str
    executions: int
    position: int = -1  # in its computation's schedule
    bwd_matmuls_after: int = -1  # backward matmuls of the step scheduled after it (compiled view)
    bwd_matmuls_overlapped: int = -1  # between an async start and its done (compiled view)
    bwd_matmuls_independent: int = -1  # backward matmuls neither feeding it nor waiting for it (program view)

    @property
    def degenerate(self) -> bool:
        return self.group_size == 1

    def wire_bytes(self) -> float:
        return wire_factor(self.kind, self.group_size) * self.bytes


def role_of(shapes: list[tuple[int, ...]], param_shapes: set, token_dims: set) -> str:
    if all(not dims for dims in shapes):
        return "scalar"
    if all(dims in param_shapes for dims in shapes if dims):
        return "param grad"
    if any(d in token_dims for dims in shapes for d in dims):
        return "activation"
    if all(len(dims) == 4 for dims in shapes):
        return "state"
    return "other"


def collectives(module: HloModule, *, param_shapes: set, token_dims: set, program: bool) -> list[Collective]:
    """Every collective of the module (``-start`` of an async pair; ``-done`` skipped)."""
    out = []
    entry_ops = module.computations[module.entry]
    for i in module.instr.values():
        kind = i.opcode.removesuffix("-start")
        if kind not in KINDS:
            continue
        operand_arrays = [
            a
            for ref in re.findall(r"%([\w.\-]+(?:#\d+)?)", i.text.split("(", 1)[1].split(")")[0])
            for a in module.operand_arrays(ref)
        ] or arrays(i.shape)
        axes, size = group(i.text)
        c = Collective(
            name=i.name,
            kind=kind,
            dtype="+".join(sorted({dt for dt, _ in operand_arrays})),
            shape=" ".join(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in operand_arrays),
            bytes=sum(array_bytes(dt, dims) for dt, dims in operand_arrays),
            axes=axes,
            group_size=size,
            phase="backward" if "transpose(" in module.context(i.name) else "forward",
            role=role_of([dims for _, dims in operand_arrays], param_shapes, token_dims),
            computation="entry" if i.computation == module.entry else i.computation,
            executions=module.executions(i.computation),
            position=i.index,
        )
        result_role = role_of([dims for _, dims in arrays(i.shape)], param_shapes, token_dims)
        users = [module.instr[u].opcode for u in module._users().get(i.name, ())]
        if kind == "all-gather" and result_role == "param grad":
            c.role = "params"  # ZeRO-1: the updated parameters gathered from each device's slice
        elif kind == "all-reduce" and c.role == "param grad" and users and set(users) == {"dynamic-slice"}:
            c.role = "grad slice"  # all-reduce + dynamic-slice: a reduce-scatter after XLA GPU's ReduceScatterCreator
        if program and i.computation == module.entry:
            linked = module.ancestors(i.name) | module.descendants(i.name)
            c.bwd_matmuls_independent = sum(module.backward_matmuls(n) for n in entry_ops if n not in linked)
        if not program:
            ops = module.computations[i.computation]
            c.bwd_matmuls_after = sum(module.backward_matmuls(n) for n in ops[i.index + 1 :])
            if i.opcode.endswith("-start"):
                done = next((n for n in ops[i.index + 1 :] if i.name in module.instr[n].operands), None)
                end = module.instr[done].index if done else i.index
                c.bwd_matmuls_overlapped = sum(module.backward_matmuls(n) for n in ops[i.index + 1 : end])
        out.append(c)
    return sorted(out, key=lambda c: (c.computation != "entry", c.computation, c.position))


# ---- the step, compiled -------------------------------------------------------------------------


def compile_modules(trainer, dump_dir: str) -> tuple[str, str]:
    """(module after SPMD partitioning, optimized module) of the compiled train step, as text."""
    import memory_report

    lowered = trainer.train_step.lower(*memory_report.abstract_step_inputs(trainer))
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True, "xla_dump_hlo_pass_re": "spmd-partitioning"}
    compiled = lowered.compile(compiler_options=options)
    files = sorted(glob.glob(os.path.join(dump_dir, "*train_step*after_spmd-partitioning*.txt")), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"XLA wrote no module after spmd-partitioning under {dump_dir}")
    with open(files[-1]) as fh:
        return fh.read(), compiled.as_text()


def shape_sets(trainer, tokens: int, sp: int) -> tuple[set, set]:
    """(parameter shapes, token dimensions) of a trainer compiled at ``tokens`` per device."""
    import jax

    params = {tuple(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"])}
    params |= {s[::-1] for s in params}  # a weight gradient may come out transposed
    chunks = trainer.config.run.loss_chunks
    token_dims = {tokens, tokens * sp, tokens // chunks}
    clash = token_dims & {d for s in params for d in s}
    if clash:
        print(f"# warning: token dimension(s) {sorted(clash)} equal a parameter dimension: pick another --tokens")
    return params, token_dims


def signature(c: Collective) -> tuple:
    return (c.kind, c.dtype, c.shape, c.axes, c.group_size, c.phase, c.role, c.computation != "entry")


def extrapolate(by_depth: dict[int, list[Collective]], target_layers: int, scale: float, token_dims: set) -> list[dict]:
    """One row per signature: count at ``target_layers`` (linear in depth from the compiled depths) and
    bytes with every token dimension scaled by ``scale``."""
    depths = sorted(by_depth)
    counts = {d: defaultdict(int) for d in depths}
    sample, independent = {}, defaultdict(list)
    for d in depths:
        for c in by_depth[d]:
            counts[d][signature(c)] += 1
            sample.setdefault(signature(c), c)
            if d == depths[-1] and c.bwd_matmuls_independent >= 0:
                independent[signature(c)].append(c.bwd_matmuls_independent)
    rows = []
    for sig, c in sample.items():
        n = [counts[d][sig] for d in depths]
        per_layer = (n[-1] - n[0]) / (depths[-1] - depths[0]) if len(depths) > 1 else 0.0
        fixed = n[0] - per_layer * depths[0]
        count = round(fixed + per_layer * target_layers) if len(depths) > 1 else n[0]
        grows = any(dim in token_dims for _, dims in arrays(c.shape) for dim in dims)
        size = c.bytes * (scale if grows else 1.0)
        rows.append(
            {
                **{k: v for k, v in asdict(c).items() if k in ("kind", "dtype", "axes", "group_size", "phase", "role")},
                "shape": c.shape,
                "in_loop": c.computation != "entry",
                "per_layer": per_layer,
                "count": count,
                "executions_each": c.executions,
                "bytes_each": size,
                "bytes_total": size * count * c.executions,
                "wire_bytes_total": wire_factor(c.kind, c.group_size) * size * count * c.executions,
                "bwd_matmuls_independent": independent.get(sig, [-1]),
            }
        )
    return sorted(rows, key=lambda r: -r["bytes_total"])


def totals(rows: list[dict], link_gbps: float) -> list[dict]:
    sums = defaultdict(lambda: [0, 0.0, 0.0])
    for r in rows:
        key = (r["kind"], r["dtype"], "degenerate" if r["group_size"] == 1 else r["role"])
        sums[key][0] += r["count"] * r["executions_each"]
        sums[key][1] += r["bytes_total"]
        sums[key][2] += r["wire_bytes_total"]
    return [
        {"kind": k, "dtype": d, "role": role, "ops": n, "bytes": b, "wire_bytes": w, "ms": 1e3 * w / (link_gbps * 1e9)}
        for (k, d, role), (n, b, w) in sorted(sums.items(), key=lambda kv: -kv[1][1])
    ]


def format_program(rows: list[dict], layers: int, tokens: int, total_bwd: int) -> str:
    lines = [
        f"\nthe program after SPMD partitioning, extrapolated to {layers} layers, {tokens} tokens per device "
        f"(independent backward matmuls: of {total_bwd} at the compiled depth):",
        f"{'kind':>18} {'dtype':>5} {'role':>10} {'phase':>8} {'axes(n)':>10} {'count':>5} {'x loop':>6} "
        f"{'MB each':>9} {'MB total':>9} {'indep. bwd matmuls':>18}  shape",
    ]
    for r in rows:
        axes = f"{r['axes']}({r['group_size']})"
        indep = r["bwd_matmuls_independent"]
        indep = "-" if indep == [-1] else f"{min(indep)}..{max(indep)}" if len(set(indep)) > 1 else str(indep[0])
        lines.append(
            f"{r['kind']:>18} {r['dtype']:>5} {r['role']:>10} {r['phase']:>8} {axes:>10} {r['count']:>5} "
            f"{r['executions_each']:>6} {r['bytes_each'] / 1e6:>9.1f} {r['bytes_total'] / 1e6:>9.1f} {indep:>18}  "
            f"{r['shape'][:60]}"
        )
    return "\n".join(lines)


def format_totals(sums: list[dict], link_gbps: float) -> str:
    lines = [f"\nsums by kind, dtype and role (ms: wire bytes over {link_gbps:.0f} GB/s, an estimate):"]
    lines.append(f"{'kind':>18} {'dtype':>8} {'role':>10} {'ops':>6} {'MB':>9} {'wire MB':>9} {'ms':>7}")
    for s in sums:
        lines.append(
            f"{s['kind']:>18} {s['dtype']:>8} {s['role']:>10} {s['ops']:>6} {s['bytes'] / 1e6:>9.1f} "
            f"{s['wire_bytes'] / 1e6:>9.1f} {s['ms']:>7.2f}"
        )
    return "\n".join(lines)


def format_compiled(cs: list[Collective], layers: int, tokens: int, total_bwd: int) -> str:
    lines = [
        f"\nthe compiled step ({layers} layers, {tokens} tokens per device; {total_bwd} backward matmuls in all):",
        f"{'name':>22} {'kind':>18} {'dtype':>8} {'role':>10} {'phase':>8} {'axes(n)':>10} {'x loop':>6} "
        f"{'MB':>9} {'pos':>5} {'bwd mm after':>12} {'overlapped':>10}",
    ]
    for c in cs:
        axes = f"{c.axes}({c.group_size})"
        over = "sync" if c.bwd_matmuls_overlapped < 0 else str(c.bwd_matmuls_overlapped)
        where = "" if c.computation == "entry" else f"  in {c.computation[:40]}"
        lines.append(
            f"{c.name[:22]:>22} {c.kind:>18} {c.dtype:>8} {c.role:>10} {c.phase:>8} {axes:>10} {c.executions:>6} "
            f"{c.bytes / 1e6:>9.1f} {c.position:>5} {c.bwd_matmuls_after:>12} {over:>10}{where}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    args, rest = parse_args(argv)
    import train_step

    step_args = train_step.parse_args(rest)
    n = args.sp * step_args.dp * step_args.tp
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # fake CPU devices; no effect on a GPU's count
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(n, 8)}"
    import jax

    from models.config import get_config

    preset = step_args.preset[0]
    target_layers = args.target_layers or get_config(preset).n_layers
    target_tokens = step_args.tokens_per_device
    if step_args.loss_chunks == "auto":  # the loss loop of the target length
        step_args.loss_chunks = str(train_step.loss_chunks_for(step_args, target_tokens, args.sp))
    dump_root = args.dump or tempfile.mkdtemp(prefix="sp_collectives_")
    print(
        f"# collectives of the {preset} train step, sp={args.sp} dp={step_args.dp} tp={step_args.tp}, on "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; strategy {step_args.strategy}, impl "
        f"{step_args.impl}, remat {step_args.remat}, loss chunks {step_args.loss_chunks}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '').strip()!r}; dumps under {dump_root}"
    )
    by_depth, compiled_view, token_dims = {}, [], set()
    for layers in args.layers:
        trainer = train_step.build_trainer(
            step_args, preset=preset, sp=args.sp, local_tokens=args.tokens, remat=step_args.remat, n_layers=layers
        )
        param_shapes, token_dims = shape_sets(trainer, args.tokens, args.sp)
        partitioned, optimized = compile_modules(trainer, os.path.join(dump_root, f"L{layers}"))
        program, final = HloModule(partitioned), HloModule(optimized)
        for body, trips in final.trips.items():  # trip counts the partitioner's module does not carry yet
            base = re.search(r"region_[\d.]+_spmd", body)
            for name in program.computations:
                if base and base.group(0) in name and trips:
                    program.trips[name] = trips
        by_depth[layers] = collectives(program, param_shapes=param_shapes, token_dims=token_dims, program=True)
        compiled_view = collectives(final, param_shapes=param_shapes, token_dims=token_dims, program=False)
        total_bwd = sum(final.backward_matmuls(n) for n in final.computations[final.entry])
        program_bwd = sum(program.backward_matmuls(n) for n in program.computations[program.entry])
        print(f"# compiled {layers} layer(s): {len(by_depth[layers])} collectives in the program", flush=True)
    rows = extrapolate(by_depth, target_layers, target_tokens / args.tokens, token_dims)
    sums = totals(rows, args.link_gbps)
    print(format_program(rows, target_layers, target_tokens, program_bwd))
    print(format_totals(sums, args.link_gbps))
    print(format_compiled(compiled_view, max(args.layers), args.tokens, total_bwd))
    if args.json:
        report = {
            "preset": preset,
            "sp": args.sp,
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "target_layers": target_layers,
            "target_tokens": target_tokens,
            "program": rows,
            "sums": sums,
            "compiled": [asdict(c) for c in compiled_view],
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
