"""Where a training step's device time goes: a ``jax.profiler`` trace and a table by category.

``StepProfiler`` traces a window of training steps (``lasp-train --profile-steps A:B``: the steps
of 0-based index ``A ≤ i < B``); ``profile_calls`` traces a few calls of a compiled step
(``benchmarks/train_step.py --profile DIR``). Both write a TensorBoard/Perfetto trace under the
log directory (``plugins/profile/<run>/``) and read back the ``perfetto_trace.json.gz`` that
``jax.profiler.trace(..., create_perfetto_trace=True)`` writes (plain JSON: no TensorBoard plugin
needed). ``summarize`` adds up the self time of every device operation and ``format_table``
prints it by category and the top kernels:

- on a GPU, the kernels and copies on the device's stream lines (the derived "XLA Ops"/"XLA
  Modules" lines repeat the same time and are left out);
- on the CPU, the XLA operations (events naming an ``hlo_op``) on the executor threads, by self
  time (a ``while`` holds its body's operations).

Times are per step and per device (summed over the devices the trace saw, then divided).
``device_idle`` adds the time each device sat idle between its first and last operation (the
gaps in the union of its stream lines), grouped by the operations on either side of each gap: a
step whose wall time exceeds its device time waits on the host somewhere, and the pair names where.

Categories (``CATEGORIES``), from kernel and XLA op names: ``matmuls`` (cuBLAS/CUTLASS GEMMs,
Triton GEMM fusions, XLA ``dot``/``convolution``, XLA:CPU's YNNPACK/XNNPACK dot fusions),
``pallas`` (this project's Pallas kernels, named ``linear_attention_*``, ``gated_delta_rule_*``,
``flash_attention_*``), ``collectives`` (NCCL kernels, all-reduce/all-gather/reduce-scatter/
all-to-all/collective-permute/ppermute), ``fusions`` (XLA fusions, copies, transposes, concatenates,
dynamic-update-slices) and ``other``.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
from collections import defaultdict

import jax

CATEGORIES = ("matmuls", "pallas", "fusions", "collectives", "other")
CATEGORY_TITLES = {
    "matmuls": "matmuls",
    "pallas": "Pallas kernels",
    "fusions": "fusions & copies",
    "collectives": "collectives",
    "other": "other",
}
PALLAS_PREFIXES = ("linear_attention_", "gated_delta_rule_", "flash_attention_", "pallas_call")
_MATMUL = re.compile(r"gemm|xmma|cutlass|cublas|nvjet|matmul|\bdot\b|convolution|^[xy]nn_fusion")
_COLLECTIVE = re.compile(
    r"nccl|all-reduce|all_reduce|allreduce|all-gather|allgather|reduce-scatter|reducescatter|"
    r"all-to-all|alltoall|collective-permute|ppermute|psum|^send|^recv"
)
_FUSION = re.compile(r"fusion|copy|transpose|concatenate|dynamic-update-slice|dynamic_update_slice|memcpy|memset")


def categorize(name: str, hlo_op: str = "") -> str:
    """The category (one of ``CATEGORIES``) of a device operation from its kernel and XLA op names."""
    name, op = name.lower(), (hlo_op or "").lower()
    if name.startswith(PALLAS_PREFIXES) or op.startswith(PALLAS_PREFIXES):
        return "pallas"
    if _COLLECTIVE.search(name) or _COLLECTIVE.search(op):
        return "collectives"
    if _MATMUL.search(name) or _MATMUL.search(op):
        return "matmuls"
    if _FUSION.search(name) or _FUSION.search(op):
        return "fusions"
    return "other"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One row of the top-kernels table: total self time over the traced steps."""

    name: str
    category: str
    calls: int
    us: float


@dataclasses.dataclass(frozen=True)
class Gap:
    """Idle device time between two operations (by name), summed over the traced steps."""

    before: str
    after: str
    count: int
    us: float


@dataclasses.dataclass(frozen=True)
class ProfileSummary:
    """Device time of ``steps`` traced steps on ``devices`` devices: in all, by category, and per
    kernel (largest first), summed over the devices."""

    steps: int
    devices: int
    total_us: float
    by_category: dict[str, float]
    kernels: list[Kernel]
    trace_path: str
    idle_us: float = 0.0
    gaps: tuple[Gap, ...] = ()
    exposed_collectives_us: float = 0.0

    def per_step_ms(self, us: float) -> float:
        """Milliseconds per step and device of a time summed over the trace."""
        return us / 1e3 / max(self.steps * self.devices, 1)

    def as_json(self, top: int = 20) -> dict:
        return {
            "steps": self.steps,
            "devices": self.devices,
            "device_ms_per_step": self.per_step_ms(self.total_us),
            "ms_per_step": {c: self.per_step_ms(us) for c, us in self.by_category.items()},
            "top_kernels": [
                {"name": k.name, "category": k.category, "calls": k.calls, "ms_per_step": self.per_step_ms(k.us)}
                for k in self.kernels[:top]
            ],
            "idle_ms_per_step": self.per_step_ms(self.idle_us),
            "exposed_collectives_ms_per_step": self.per_step_ms(self.exposed_collectives_us),
            "top_gaps": [
                {"before": g.before, "after": g.after, "count": g.count, "ms_per_step": self.per_step_ms(g.us)}
                for g in self.gaps[:top]
            ],
            "trace": self.trace_path,
        }


def find_trace(logdir: str) -> str:
    """The newest Perfetto JSON trace under ``logdir`` (``plugins/profile/<run>/``)."""
    runs = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*")), key=os.path.getmtime)
    for run in reversed(runs):
        for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
            found = sorted(glob.glob(os.path.join(run, pattern)))
            if found:
                return found[0]
    raise FileNotFoundError(f"no trace (perfetto_trace.json.gz) under {logdir}/plugins/profile")


def load_events(path: str) -> list[dict]:
    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    return data["traceEvents"] if isinstance(data, dict) else data


def _device_lines(events: list[dict]) -> tuple[dict, bool]:
    """The events of each device line ``{(pid, tid): [event, ...]}`` (see the module), and whether
    the trace is a GPU's (the lines are stream lines) rather than the CPU's executor threads."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e.get("pid")] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
    gpus = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
    on_gpu = {key for key, name in threads.items() if key[0] in gpus and name.startswith("Stream")}
    if gpus and not on_gpu:  # no stream lines in this trace: the per-op line holds the same time
        on_gpu = {key for key, name in threads.items() if key[0] in gpus and name == "XLA Ops"}
    lines = defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        key = (e.get("pid"), e.get("tid"))
        if key in on_gpu if gpus else "hlo_op" in e.get("args", {}):
            lines[key].append(e)
    return lines, bool(gpus)


def device_operations(events: list[dict]) -> tuple[list[tuple[str, str, float]], int]:
    """``(name, hlo_op, self time in µs)`` of every device operation in a trace (see the module),
    and the number of devices they ran on."""
    lines, on_gpu = _device_lines(events)
    ops = []
    for line in lines.values():
        ops += _self_times(line)
    if on_gpu:
        devices = len({pid for pid, _ in lines})
    else:
        devices = len({e.get("args", {}).get("device_ordinal") for line in lines.values() for e in line})
    return ops, max(devices, 1)


def _device_events(events: list[dict]) -> dict:
    """``{device: [event, ...]}``: a GPU's operations on all its stream lines (they share its pid);
    on the CPU, each operation under the device it names."""
    lines, on_gpu = _device_lines(events)
    per_device = defaultdict(list)
    for (pid, _), line in lines.items():
        for e in line:
            per_device[pid if on_gpu else e.get("args", {}).get("device_ordinal")].append(e)
    return per_device


def _span(e: dict) -> tuple[float, float]:
    return float(e["ts"]), float(e["ts"]) + float(e["dur"])


def device_idle(events: list[dict]) -> tuple[float, list[Gap]]:
    """Time the devices sat idle inside the trace, in µs summed over the devices (each device from
    its first operation to its last, less the union of its operations on every stream), and the
    idle time grouped by the pair of operations around each gap, largest first.

    A device idles when the host has not yet launched the next kernel: a host round trip (a
    ``while`` loop's condition read back, a callback, a transfer), launch latency between short
    kernels, or the host preparing the next step."""
    idle, gaps = 0.0, defaultdict(lambda: [0, 0.0])
    for device_events in _device_events(events).values():
        spans = sorted((*_span(e), e.get("name", "")) for e in device_events)
        end, before = spans[0][1], spans[0][2]
        for start, stop, name in spans[1:]:
            if start > end:
                idle += start - end
                gap = gaps[(before, name)]
                gap[0] += 1
                gap[1] += start - end
            if stop > end:
                end, before = stop, name
    rows = [Gap(before, after, n, us) for (before, after), (n, us) in gaps.items()]
    rows.sort(key=lambda g: -g.us)
    return idle, rows


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The disjoint, sorted intervals covering ``spans``."""
    out: list[list[float]] = []
    for start, stop in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return [(a, b) for a, b in out]


def exposed_collectives(events: list[dict]) -> float:
    """Time a collective ran with no other operation running on its device, in µs summed over the
    devices: the part of the collectives' time that the step waits for (a collective on its own
    stream beside a matmul costs the step nothing; one alone is on the critical path or the device
    has nothing else to do)."""
    exposed = 0.0
    for device_events in _device_events(events).values():
        spans = ([], [])  # collectives, everything else
        for e in device_events:
            collective = categorize(e.get("name", ""), e.get("args", {}).get("hlo_op", "")) == "collectives"
            spans[0 if collective else 1].append(_span(e))
        others, i = _union(spans[1]), 0
        for start, stop in _union(spans[0]):  # both sorted: one walk over the others
            while i < len(others) and others[i][1] <= start:
                i += 1
            covered, j = 0.0, i
            while j < len(others) and others[j][0] < stop:
                covered += min(stop, others[j][1]) - max(start, others[j][0])
                j += 1
            exposed += stop - start - covered
    return exposed


def _self_times(line: list[dict]) -> list[tuple[str, str, float]]:
    """Self time of each event of one thread: each instant of the line is charged to the innermost
    event covering it (the one that started last; a kernel inside a thunk's span takes its time
    from the thunk), so the self times of a line add up to the time the line is busy — also when an
    event starts before the previous one ends and outlives it (a GPU's programmatic dependent
    launch lets the next kernel start early)."""
    line = sorted(line, key=lambda e: (float(e["ts"]), -float(e["dur"])))
    out = [[e.get("name", ""), e.get("args", {}).get("hlo_op", ""), 0.0] for e in line]
    spans = [_span(e) for e in line]
    points = sorted({t for span in spans for t in span})
    active, nxt = [], 0  # indices of events covering the current instant, in start order
    for left, right in zip(points, points[1:]):
        while nxt < len(spans) and spans[nxt][0] <= left:
            active.append(nxt)
            nxt += 1
        active = [i for i in active if spans[i][1] > left]
        if active:
            out[active[-1]][2] += right - left
    return [(name, op, us) for name, op, us in out]


def summarize(path: str, steps: int) -> ProfileSummary:
    """The device time of a trace of ``steps`` steps, by category and kernel."""
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    kernels: dict[str, list] = {}
    events = load_events(path)
    ops, devices = device_operations(events)
    for name, op, us in ops:
        category = categorize(name, op)
        by_category[category] += us
        row = kernels.setdefault(name, [category, 0, 0.0])
        row[1] += 1
        row[2] += us
    rows = [Kernel(name, c, n, us) for name, (c, n, us) in kernels.items()]
    rows.sort(key=lambda k: -k.us)
    idle, gaps = device_idle(events)
    exposed = exposed_collectives(events)
    total = sum(by_category.values())
    return ProfileSummary(steps, devices, total, by_category, rows, path, idle, tuple(gaps), exposed)


def format_table(summary: ProfileSummary, *, top: int = 15, gaps: int = 5, title: str = "") -> str:
    """The device-time table: ms per step and share by category, the ``top`` kernels, then the
    device's idle time and its ``gaps`` largest sources."""
    total = max(summary.total_us, 1e-9)
    ms = summary.per_step_ms
    per = "per step" if summary.devices == 1 else f"per step and device ({summary.devices} devices)"
    lines = [
        f"device time{' of ' + title if title else ''}: {ms(summary.total_us):.2f} ms {per} "
        f"({summary.steps} steps traced, {summary.trace_path})",
        f"{'category':<18} {'ms/step':>10} {'share':>7}",
    ]
    for c in CATEGORIES:
        us = summary.by_category[c]
        lines.append(f"{CATEGORY_TITLES[c]:<18} {ms(us):>10.3f} {100 * us / total:>6.1f}%")
    lines.append(f"{'top kernels':<60} {'category':<12} {'calls/step':>10} {'ms/step':>10} {'share':>7}")
    for k in summary.kernels[:top]:
        name = k.name if len(k.name) <= 60 else k.name[:57] + "..."
        calls = k.calls / max(summary.steps * summary.devices, 1)
        lines.append(f"{name:<60} {k.category:<12} {calls:>10.1f} {ms(k.us):>10.3f} {100 * k.us / total:>6.1f}%")
    if summary.by_category["collectives"]:
        lines.append(
            f"collectives with nothing else running on the device: {ms(summary.exposed_collectives_us):.2f} ms "
            f"per step of {ms(summary.by_category['collectives']):.2f} (the rest ran beside compute)"
        )
    lines.append(
        f"device idle between operations: {ms(summary.idle_us):.2f} ms per step (waiting on the host: loop "
        "conditions read back, launches, transfers); largest gaps by the operations around them:"
    )
    for g in summary.gaps[:gaps]:
        pair = f"{g.before[:40]} -> {g.after[:40]}"
        calls = g.count / max(summary.steps * summary.devices, 1)
        lines.append(f"  {pair:<84} {calls:>10.1f} {ms(g.us):>10.3f}")
    return "\n".join(lines)


def process_logdir(logdir: str) -> str:
    """``logdir`` itself on one process, a ``process_<i>`` folder in it for each of several."""
    return logdir if jax.process_count() == 1 else os.path.join(logdir, f"process_{jax.process_index()}")


@dataclasses.dataclass(frozen=True)
class ProfileWindow:
    """The steps to trace, 0-based indices ``start ≤ i < stop``, and where the trace goes."""

    start: int
    stop: int
    logdir: str = "profile"

    @classmethod
    def parse(cls, text: str, logdir: str = "profile") -> ProfileWindow:
        """``"A:B"`` (a Python slice of step indices) → the window; raises ValueError naming the flag."""
        try:
            start, stop = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"--profile-steps takes A:B (two step indices), got {text!r}") from None
        if not 0 <= start < stop:
            raise ValueError(f"--profile-steps A:B needs 0 <= A < B, got {text!r}")
        return cls(start, stop, logdir)


class StepProfiler:
    """Traces the steps of a ``ProfileWindow`` inside a training loop.

    ``before_step(i)`` before running step index i, ``after_step(i + 1, state)`` after it (and
    ``finish(state)`` when the loop ends early): the trace starts and stops with the device idle
    (``block_until_ready``), so it holds exactly the window's steps; the table goes to ``log``.
    """

    def __init__(self, window: ProfileWindow | None, *, log=print):
        self.window, self.log = window, log
        self.first: int | None = None
        self.summary: ProfileSummary | None = None

    def before_step(self, step: int, state) -> None:
        if self.window is None or self.first is not None or not self.window.start <= step < self.window.stop:
            return
        jax.block_until_ready(state)
        jax.profiler.start_trace(process_logdir(self.window.logdir), create_perfetto_trace=True)
        self.first = step

    def after_step(self, done: int, state) -> None:
        """``done``: the number of steps done (the index of the next step)."""
        if self.first is not None and self.summary is None and done >= self.window.stop:
            self.finish(state, done)

    def finish(self, state, done: int) -> None:
        """Stop a running trace after ``done`` steps, then summarize and log it."""
        if self.first is None or self.summary is not None:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        steps = done - self.first
        self.summary = summarize(find_trace(process_logdir(self.window.logdir)), steps)
        self.log(format_table(self.summary, title=f"steps {self.first}:{done}"))

    def close(self) -> None:
        """Stop a trace that is still running (the loop raised) without summarizing it."""
        if self.first is not None and self.summary is None:
            jax.profiler.stop_trace()
            self.first = None


def profile_calls(run_step, state, *, calls: int, logdir: str):
    """Trace ``calls`` calls of ``state = run_step(state)`` (device idle before and after); returns
    ``(state, ProfileSummary)``."""
    jax.block_until_ready(state)
    logdir = process_logdir(logdir)
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(calls):
            state = run_step(state)
        jax.block_until_ready(state)
    return state, summarize(find_trace(logdir), calls)


def profile_into(row: dict, run_step, state, *, calls: int, logdir: str, title: str):
    """``profile_calls`` for a benchmark row: prints the table, keeps the summary as
    ``row["profile"]``; returns the state."""
    state, summary = profile_calls(run_step, state, calls=calls, logdir=logdir)
    print(format_table(summary, title=title), flush=True)
    row["profile"] = summary.as_json()
    return state
