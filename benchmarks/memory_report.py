"""Where the device memory of a training step goes: XLA's accounting of the compiled step, by term.

The step is the one ``benchmarks/train_step.py`` times, built by its ``build_trainer`` (every
train_step flag works here: ``--preset``, ``--impl``, ``--dtype``, ``--scan-layers``,
``--loss-chunks``, ...), lowered on abstract inputs and compiled, never run: nothing is allocated,
so a 1M-token step of a 1B model compiles on a CPU (and on a GPU without touching its memory).
For every setting (``--settings remat[:mlp_chunk]``), depth (``--layers``, overriding the preset's)
and token count (``--tokens``) it reports

- ``compiled.memory_analysis()``: argument, output, alias and temp bytes, and the host bytes
  (remat ``offload``). The device needs argument + temp (the step donates its state);
- what the forward keeps for the backward (``jax.ad_checkpoint.print_saved_residuals`` of the loss,
  traced abstractly: the program's own residuals, the same on every backend), device and host,
  by source, for the shallow model and for the preset's depth;
- from XLA's dump of the compiled module (the live ranges at the peak, the buffer assignment and
  the Python frames in the HLO's metadata), the buffers live at the peak: bytes, shape, the phase
  that made them (forward, forward recomputed under remat, backward) and a category
  (``CATEGORIES``), summed per category and listed for the largest token count;
- fits ``bytes = a + b·T`` of the working set (temp minus the saved residuals and the parameter
  gradients: what the layer being differentiated needs) and the predicted device bytes at
  ``--predict`` tokens and the preset's depth: arguments + gradients + saved residuals (exact, at
  that depth and length) + the working set (extrapolated in T).

The CPU's buffer assignment is not the GPU's (XLA:CPU keeps float32 copies of bf16 operands around
its dot and reduce fusions, copies the operands of Pallas interpret-mode loops and zero-fills their
outputs, and drops remat ``offload``'s host transfers), so its working set overstates a GPU's; the
saved residuals are the same program on both. Use ``--impl pallas`` on the CPU: a GPU runs the
Pallas kernels (``impl="auto"`` takes the XLA chunked path off the GPU). On a GPU the same command
reports the GPU's own buffers (compile only: it fits where the step does not).

    python benchmarks/memory_report.py --impl pallas --layers 1 2 --tokens 131072 262144 524288 \\
        --settings full full:65536 offload:65536 --predict 1048576 --json memory.json
    python benchmarks/memory_report.py --layers 16 --tokens 1048576 --settings offload:65536   # on the H200
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict

GIB, KIB = 2**30, 2**10

# (category, functions or file parts of the frames that made a buffer): the first that any frame matches wins
CATEGORIES = (
    ("linear-attention op", ("pallas_kernels/linear_attention/",)),
    ("loss and logits", ("cross_entropy_sum", "_cross_entropy_bwd", "head_logits", "/models/loss.py")),
    ("MLP", ("Mlp.__call__", "Mlp._apply")),
    ("q/k/v/u projection", ("LinearAttention._project", "ProjectedAttention._split_qkv")),
    ("attention output (norm, gate, W_o)", ("LinearAttention._finish", "ProjectedAttention._output")),
    ("norms", ("Norm.__call__", "/models/tokenwise.py")),
    # (a block's input as the layer function sees it, its offloaded copy made by nnx.remat, the scan's stack)
    (
        "residual stream (block inputs)",
        ("Block.__call__", "LanguageModel.hidden", "LaspContext.constrain", "/nnx/", "/models/layer_scan.py"),
    ),
    ("embedding", ("Embed.__call__",)),
    ("optimizer update", ("/optax/",)),
    ("gradients", ("Trainer._mean_grads",)),
)
PARAMS = "params and optimizer state"
FILLS = "kernel operand copies and zero fills (interpret mode: CPU only)"
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "u32": 4, "i64": 8, "i8": 1, "u8": 1, "bool": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="other flags go to train_step.py")
    p.add_argument("--tokens", type=int, nargs="+", default=[131072, 262144, 524288], help="tokens per device")
    p.add_argument("--layers", type=int, nargs="+", default=[1], help="model depths compiled (the preset's: 0)")
    p.add_argument("--settings", nargs="+", default=["full"], help="remat[:mlp_chunk], e.g. full offload:65536")
    p.add_argument("--predict", type=int, default=1048576, help="tokens per device of the prediction")
    p.add_argument("--top", type=int, default=25, help="buffers listed at the peak")
    p.add_argument("--dump", default=None, help="keep XLA's dumps here (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args, rest = p.parse_known_args(argv)
    import train_step  # benchmarks/ is on the path: this file runs as a script from it

    return args, train_step.parse_args(rest)


def settings_of(text: str) -> tuple[str, int]:
    remat, _, chunk = text.partition(":")
    return remat, int(chunk or 0)


# ---- the step, compiled and traced --------------------------------------------------------------


def abstract_step_inputs(trainer, *, shardings: bool = True):
    """``(state, inputs, targets)`` of the train step as shape-dtype structs (with the trainer's shardings)."""
    import jax
    import jax.numpy as jnp

    def struct(a, sharding):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding if shardings else None)

    state = jax.tree.map(struct, trainer.abstract_state, trainer.state_shardings)
    data = trainer.config.data
    tokens = struct(
        jax.ShapeDtypeStruct((data.grad_accum, data.micro_batch, data.seq_len), jnp.int32), trainer.batch_sharding
    )
    return state, tokens, tokens


def compile_step(trainer, dump_dir: str):
    """The compiled train step (XLA's dump of it, with the live ranges, in ``dump_dir``) and its seconds."""
    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(*abstract_step_inputs(trainer))
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True, "xla_dump_buffer_assignment_analysis": True}
    try:
        compiled = lowered.compile(compiler_options=options)
    except Exception as e:  # an XLA without the analysis option: the buffer assignment alone
        if "xla_dump_buffer_assignment_analysis" not in str(e):
            raise
        compiled = lowered.compile(compiler_options={k: v for k, v in options.items() if "analysis" not in k})
    return compiled, time.perf_counter() - t0


def memory_row(compiled) -> dict:
    m = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp")
    row = {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes")) for f in fields}
    row |= {f"host_{f}_bytes": int(getattr(m, f"host_{f}_size_in_bytes", 0) or 0) for f in fields}
    return row


def state_bytes(trainer) -> tuple[int, int]:
    """``(train state, parameters)`` bytes: the step's donated arguments, and its gradients' size."""
    import jax

    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return nbytes(trainer.abstract_state), nbytes(trainer.abstract_state["params"])


def saved_residuals(trainer) -> list[dict]:
    """What the forward of the step's loss keeps for its backward (traced abstractly, nothing runs):
    one dict per residual with bytes, shape, memory (device or host) and source (the producing
    function, as ``jax.ad_checkpoint.print_saved_residuals`` names it); parameters left out."""
    import jax
    from jax.ad_checkpoint import print_saved_residuals

    state, tokens, _ = abstract_step_inputs(trainer, shardings=False)
    tokens = jax.ShapeDtypeStruct(tokens.shape[1:], tokens.dtype)  # one micro-batch, as the step runs it

    def loss(params, inputs, targets):  # the step differentiates the trainer's own loss sum
        return trainer.loss_sum(params, inputs, targets)[0]

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_saved_residuals(loss, state["params"], tokens, tokens)
    rows = []
    for line in text.getvalue().splitlines():
        m = re.match(r"(\w+)(?:<(\w+)>)?\[([\d,]*)\] (.*)$", line.strip())
        if not m or "from the argument" in line:
            continue
        dtype, memory, dims, source = m.groups()
        size = DTYPE_BYTES.get(dtype, 4)
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        function = re.search(r"\(([^()]*)\)\s*$", source)
        frames = [(source, function.group(1) if function else "")]
        rows.append(
            {
                "bytes": size,
                "shape": f"{dtype}[{dims}]",
                "memory": "host" if memory and "host" in memory else "device",
                "source": source,
                "category": category(frames, False),
            }
        )
    return rows


def residual_totals(rows: list[dict]) -> dict:
    """Device and host bytes of the saved residuals, and the device bytes per category."""
    out = {"device": 0, "host": 0, "by_category": defaultdict(int)}
    for r in rows:
        out[r["memory"]] += r["bytes"]
        if r["memory"] == "device":
            out["by_category"][r["category"]] += r["bytes"]
    out["by_category"] = dict(out["by_category"])
    return out


# ---- the dump: buffers live at the peak ----------------------------------------------------------


def _dump_file(dump_dir: str, suffix: str) -> str | None:
    files = sorted(glob.glob(os.path.join(dump_dir, f"*train_step*after_optimizations{suffix}")), key=os.path.getmtime)
    return files[-1] if files else None


class HloIndex:
    """Shapes, producing ops and Python frames of the instructions of a dumped HLO module."""

    def __init__(self, text: str):
        self.text = text
        self.instr = {}  # name -> (shape text, opcode, op_name, stack frame id, operands, called computation)
        pattern = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) (\S+?)\((.*)$")
        self.roots = {}
        computation = None
        for line in text.splitlines():
            head = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
            if head and not line.startswith(" "):
                computation = head.group(1)
                continue
            m = pattern.match(line)
            if not m:
                continue
            name, shape, opcode, rest = m.groups()
            op_name = re.search(r'op_name="([^"]*)"', rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            self.instr[name] = (
                shape,
                opcode,
                op_name.group(1) if op_name else None,
                int(frame.group(1)) if frame else None,
                operands,
                calls.group(1) if calls else None,
            )
            if line.lstrip().startswith("ROOT") and computation:
                self.roots[computation] = name
        self.users = defaultdict(list)
        for name, info in self.instr.items():
            for operand in info[4]:
                self.users[operand].append(name)
        self._frames = self._read_frames()

    def _section(self, title: str) -> list[str]:
        start = self.text.find(f"\n{title}\n")
        if start < 0:
            return []
        body = self.text[start + len(title) + 2 :]
        return body[: body.find("\n\n")].splitlines()

    def _read_frames(self):
        files = {int(i): s.strip('"') for i, s in (line.split(None, 1) for line in self._section("FileNames"))}
        funcs = {int(i): s.strip('"') for i, s in (line.split(None, 1) for line in self._section("FunctionNames"))}
        locations = {}
        for line in self._section("FileLocations"):
            fields = dict(re.findall(r"(\w+)=(\d+)", line))
            locations[int(line.split()[0])] = (
                files[int(fields["file_name_id"])],
                funcs[int(fields["function_name_id"])],
            )
        frames = {}
        for line in self._section("StackFrames"):
            fields = dict(re.findall(r"(\w+)=(\d+)", line))
            # the text prints each parent id one above the frame number it lists the parent under
            frames[int(line.split()[0])] = (
                locations[int(fields["file_location_id"])],
                int(fields["parent_frame_id"]) - 1,
            )
        return frames

    def frames(self, frame_id: int | None) -> list[tuple[str, str]]:
        """(file, function) of the frame and its callers, innermost first."""
        out, seen = [], set()
        while frame_id and frame_id in self._frames and frame_id not in seen:
            seen.add(frame_id)
            location, frame_id = self._frames[frame_id]
            out.append(location)
        return out

    def origin(self, name: str, depth: int = 0, *, down: bool = False) -> tuple[str | None, list, bool]:
        """``(op_name, frames, from_parameter)`` of an instruction; ``from_parameter``: it is (a copy
        of) an argument of the step. One without metadata (a copy, a fusion or broadcast XLA made)
        takes that of its fused root, else of its first operand that has some, else (a constant's
        broadcast, e.g. a kernel's zeroed output) of its first user that has some."""
        info = self.instr.get(name)
        if info is None or depth > 12:
            return None, [], False
        _, opcode, op_name, frame, operands, calls = info
        if opcode == "parameter":  # an argument of the step, or of a fused or loop computation (no metadata)
            return None, [], name.startswith("state_")
        if op_name or frame:
            return op_name, self.frames(frame), False
        sources = [self.roots[calls]] if calls in self.roots else []
        for source in sources + ([] if down else operands):
            found = self.origin(source, depth + 1, down=down)
            if any(found):
                return found
        for user in self.users.get(name, ())[:4]:
            found = self.origin(user, depth + 1, down=True)
            if found[0] or found[1]:
                return found
        return None, [], False

    def constant_fill(self, name: str, depth: int = 0) -> bool:
        """Whether the instruction only copies or broadcasts constants (e.g. the zero-filled outputs
        that Pallas interpret mode allocates for a kernel: CPU only; a GPU kernel writes its outputs)."""
        info = self.instr.get(name)
        if info is None or depth > 6:
            return False
        _, opcode, _, _, operands, calls = info
        if opcode == "constant":
            return True
        if opcode not in ("copy", "broadcast", "fusion", "bitcast") or not operands:
            return False
        return all(self.constant_fill(o, depth + 1) for o in operands)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _value_shapes(assignment_text: str) -> dict[str, str]:
    """``name{index}`` → shape of every value in the buffer assignment."""
    shapes = {}
    for name, shape in re.findall(r"value: <\d+ (\S+) @\d+> \(size=\d+,offset=\d+\): (\S+)", assignment_text):
        shapes[name] = shape
    return shapes


def phase(op_name: str | None) -> str:
    if not op_name:
        return ""
    if "rematted_computation" in op_name:
        return "recomputed"
    return "backward" if "transpose(" in op_name else "forward"


def category(frames, from_parameter: bool) -> str:
    """The first of ``CATEGORIES`` whose function or file part a frame matches (arguments: ``PARAMS``)."""
    if from_parameter:
        return PARAMS
    for label, keys in CATEGORIES:
        if any(key == fn or ("/" in key and key in f) for f, fn in frames for key in keys):
            return label
    return "other"


def cpu_only(shape: str, label: str, tokens: int) -> bool:
    """A buffer a GPU would not hold: Pallas interpret mode's loop operands and zero fills, or a
    float32 copy of a bf16 activation (``f32[..., T, ≥ 1024]``: the model's own float32 per-token
    values are ``[T, 1]`` statistics and ``[H, T]`` decay terms; XLA:CPU materialises float32
    operands of its bf16 dots and reductions, XLA:GPU fuses those converts)."""
    m = re.match(r"f32\[([\d,]*)\]", shape)
    dims = [int(x) for x in m.group(1).split(",") if x] if m else []
    wide_f32 = tokens in dims and dims[-1] >= 1024 and dims.index(tokens) < len(dims) - 1
    return label == FILLS or wide_f32


def peak_buffers(dump_dir: str, tokens: int) -> list[dict]:
    """Every value live at the peak of the step's dumped module: name, bytes, shape, phase, frames,
    category, and whether it is a CPU artifact (``cpu_only``)."""
    live_path, hlo_path = _dump_file(dump_dir, "-live-range.txt"), _dump_file(dump_dir, ".txt")
    assignment_path = _dump_file(dump_dir, "-buffer-assignment.txt")
    if not (live_path and hlo_path and assignment_path):
        return []
    live = _read(live_path)
    peak = live[live.find("(peak):") :]
    peak = peak[: peak.find("Stack trace")]
    hlo = HloIndex(_read(hlo_path))
    shapes = _value_shapes(_read(assignment_path))
    rows = []
    for name, index, size in re.findall(r"^\s+(\S+?)(\{[\d,]*\}): (\d+) bytes", peak, flags=re.M):
        key = name + ("" if index == "{}" else index)
        op_name, frames, from_parameter = hlo.origin(name)
        interpret = any("pallas_triton" in f for f, _ in frames) and hlo.constant_fill(name)
        label = FILLS if interpret else category(frames, from_parameter)
        shape = shapes.get(key, hlo.instr.get(name, ("?",))[0])
        rows.append(
            {
                "value": key,
                "bytes": int(size),
                "shape": shape,
                "phase": phase(op_name),
                "frames": [fn for f, fn in frames if "/site-packages/" not in f][:4],
                "category": label,
                "cpu_only": cpu_only(shape, label, tokens),
            }
        )
    return sorted(rows, key=lambda r: -r["bytes"])


def by_category(buffers: list[dict]) -> dict[str, int]:
    totals = defaultdict(int)
    for b in buffers:
        totals[b["category"]] += b["bytes"]
    return dict(totals)


# ---- fits and the prediction ------------------------------------------------------------------


def linear_fit(xs, ys) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b·x`` (b = 0 from a single point)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n == 1 or sxx == 0:
        return float(my), 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def working_set(row: dict) -> int:
    """Temp bytes beyond what the backward holds at any depth (the saved residuals and the parameter
    gradients): the differentiated layer's and the loss's working set. A backend that reports no
    host temp (the CPU drops remat ``offload``'s transfers) holds the offloaded residuals in its temp."""
    offloaded = row["saved"]["host"] if row["host_temp_bytes"] == 0 else 0
    return row["temp_bytes"] - row["saved"]["device"] - offloaded - row["param_bytes"]


def fit_setting(rows: list[dict]) -> dict:
    """Per depth: ``a + b·T`` of the temp, of the working set and of each category at the peak."""
    out = {}
    for layers in sorted({r["layers"] for r in rows}):
        at = sorted((r for r in rows if r["layers"] == layers), key=lambda r: r["tokens"])
        ts = [r["tokens"] for r in at]
        fit = {
            "temp": linear_fit(ts, [r["temp_bytes"] for r in at]),
            "working": linear_fit(ts, [working_set(r) for r in at]),
            "working_gpu_like": linear_fit(ts, [working_set(r) - r["cpu_only_bytes"] for r in at]),
        }
        cats = sorted({c for r in at for c in r["peak_by_category"]})
        fit["peak"] = {c: linear_fit(ts, [r["peak_by_category"].get(c, 0) for r in at]) for c in cats}
        fit["saved"] = linear_fit(ts, [r["saved"]["device"] for r in at])
        out[layers] = fit
    return out


def predict(fit: dict, *, deep: dict, working: str = "working") -> dict:
    """Device bytes at ``deep``'s depth and length: its arguments, gradients and saved residuals (exact)
    plus the ``working`` set fitted at the deepest compiled depth, extrapolated in T."""
    layers = max(fit)
    a, b = fit[layers][working]
    parts = {
        "arguments": deep["state_bytes"],
        "gradients": deep["param_bytes"],
        "saved residuals": deep["saved"]["device"],
        "working set": a + b * deep["tokens"],
    }
    return {
        "tokens": deep["tokens"],
        "layers": deep["layers"],
        "parts": parts,
        "device_bytes": sum(parts.values()),
        "host_bytes": deep["saved"]["host"],
        "from_layers": layers,
    }


# ---- printing ---------------------------------------------------------------------------------


def format_buffers(buffers: list[dict], top: int) -> str:
    lines = [f"{'GiB':>7}  {'phase':<10} {'category':<36} {'shape':<28} made in (innermost first)"]
    for b in buffers[:top]:
        lines.append(
            f"{b['bytes'] / GIB:>7.2f}  {b['phase']:<10} {b['category'][:36]:<36} {b['shape'].split('{')[0][:28]:<28} "
            f"{' < '.join(b['frames'][:3])}"
        )
    rest = sum(b["bytes"] for b in buffers[top:])
    lines.append(f"{rest / GIB:>7.2f}  (the {max(0, len(buffers) - top)} other values)")
    return "\n".join(lines)


def format_residuals(rows: list[dict], tokens: int, layers: int) -> str:
    """The saved residuals grouped by shape, memory and source, largest first."""
    groups = defaultdict(lambda: [0, 0])
    for r in rows:
        key = (r["memory"], r["shape"], r["category"], r["source"].split(" from ")[-1][-70:])
        groups[key][0] += 1
        groups[key][1] += r["bytes"]
    lines = [f"saved for the backward, {layers} layer(s), {tokens} tokens ({'GiB':>6}, KiB/token):"]
    for (memory, shape, cat, source), (count, size) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:12]:
        what = f"{count:>3} × {shape:<24} {memory:<6} {cat[:30]:<30} {source}"
        lines.append(f"  {size / GIB:>7.2f} {size / tokens / KIB:>7.2f}  {what}")
    return "\n".join(lines)


def format_fits(setting: str, fit: dict, predictions: dict) -> str:
    lines = [f"\n{setting}:"]
    for layers, f in fit.items():
        (ta, tb), (wa, wb), (ga, gb), sb = f["temp"], f["working"], f["working_gpu_like"], f["saved"][1]
        lines.append(
            f"  {layers} layer(s): temp {ta / GIB:.2f} GiB + {tb / KIB:.1f} KiB·T = saved {sb / KIB:.1f} KiB·T "
            f"+ gradients + working set {wa / GIB:.2f} GiB + {wb / KIB:.1f} KiB·T "
            f"(without CPU-only buffers: {ga / GIB:.2f} GiB + {gb / KIB:.1f} KiB·T)"
        )
        lines.append("    at the peak, by category (KiB/token, GiB fixed):")
        for cat, (ca, cb) in sorted(f["peak"].items(), key=lambda kv: -kv[1][1]):
            lines.append(f"      {cat[:60]:<60} {cb / KIB:>7.2f} {ca / GIB:>7.2f}")
    for name, p in predictions.items():
        parts = ", ".join(f"{part} {size / GIB:.1f}" for part, size in p["parts"].items())
        lines.append(
            f"  predicted at {p['tokens']} tokens, {p['layers']} layers ({name} working set of {p['from_layers']} "
            f"layer(s)): {p['device_bytes'] / GIB:.1f} GiB on the device ({parts}), "
            f"{p['host_bytes'] / GIB:.1f} GiB saved on the host"
        )
    return "\n".join(lines)


def depth_row(step_args, train_step, *, preset: str, setting: str, layers: int, tokens: int) -> dict:
    """Arguments, gradients and saved residuals of a depth and length (traced, not compiled)."""
    remat, _ = settings_of(setting)
    trainer = train_step.build_trainer(
        step_args, preset=preset, sp=1, local_tokens=tokens, remat=remat, n_layers=layers
    )
    state, params = state_bytes(trainer)
    residuals = saved_residuals(trainer)
    return {
        "layers": layers,
        "tokens": tokens,
        "state_bytes": state,
        "param_bytes": params,
        "saved": residual_totals(residuals),
        "residuals": residuals,
    }


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args, step_args = parse_args(argv)
    import jax
    import train_step

    from models.config import get_config

    preset = step_args.preset[0]
    full_depth = get_config(preset).n_layers
    depths = [layers or full_depth for layers in args.layers]
    dump_root = args.dump or tempfile.mkdtemp(prefix="memory_report_")
    print(f"# memory of the {preset} train step on {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"# impl {step_args.impl}, dtype {step_args.dtype}, XLA dumps under {dump_root}")
    report = {}
    for setting in args.settings:
        remat, chunk = settings_of(setting)
        step_args.mlp_chunk = chunk
        rows, peaks = [], {}
        for layers in depths:
            for tokens in sorted(args.tokens):
                row = depth_row(step_args, train_step, preset=preset, setting=setting, layers=layers, tokens=tokens)
                trainer = train_step.build_trainer(
                    step_args, preset=preset, sp=1, local_tokens=tokens, remat=remat, n_layers=layers
                )
                dump_dir = os.path.join(dump_root, f"{remat}_{chunk}_L{layers}_T{tokens}")
                compiled, seconds = compile_step(trainer, dump_dir)
                buffers = peak_buffers(dump_dir, tokens)
                row |= memory_row(compiled) | {"setting": setting, "compile_s": seconds}
                row["peak_by_category"] = by_category(buffers)
                row["cpu_only_bytes"] = sum(b["bytes"] for b in buffers if b["cpu_only"])
                rows.append(row)
                peaks[layers] = (tokens, buffers, row["residuals"])
                print(
                    f"{setting:>16} {layers:>3} layers {tokens:>9} tokens: argument {row['argument_bytes'] / GIB:7.2f} "
                    f"temp {row['temp_bytes'] / GIB:7.2f} (saved {row['saved']['device'] / GIB:6.2f}) "
                    f"host {row['host_temp_bytes'] / GIB:6.2f} GiB, saved on the host "
                    f"{row['saved']['host'] / GIB:6.2f} GiB (compile {seconds:.0f} s)",
                    flush=True,
                )
                del compiled, trainer
        for layers, (tokens, buffers, residuals) in peaks.items():
            print(f"\n{setting}, {layers} layer(s), {tokens} tokens: live at the peak")
            print(format_buffers(buffers, args.top))
            print(format_residuals(residuals, tokens, layers))
        deep = depth_row(step_args, train_step, preset=preset, setting=setting, layers=full_depth, tokens=args.predict)
        print(format_residuals(deep["residuals"], args.predict, full_depth))
        fit = fit_setting(rows)
        predictions = {
            "compiled": predict(fit, deep=deep),
            "without CPU-only buffers": predict(fit, deep=deep, working="working_gpu_like"),
        }
        print(format_fits(setting, fit, predictions))
        for r in rows + [deep]:
            r.pop("residuals")
        report[setting] = {"rows": rows, "fit": {str(k): v for k, v in fit.items()}, "predictions": predictions}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
