"""The profile's idle time: gaps between a device's operations, over all its streams, by the
operations around them (models.profile.device_idle)."""

from __future__ import annotations

import gzip
import json

from models.profile import Gap, format_table, summarize


def _trace(tmp_path, kernels):
    """A GPU trace whose stream lines hold ``kernels``: (stream tid, name, start µs, duration µs)."""
    gpu = 7
    events = [
        {"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0 (NVIDIA H200)"}},
        {"ph": "M", "pid": gpu, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": gpu, "tid": 2, "name": "thread_name", "args": {"name": "Stream #14(MemcpyD2H)"}},
        {"ph": "M", "pid": gpu, "tid": 3, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    for tid, name, ts, dur in kernels:
        events.append({"ph": "X", "pid": gpu, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": {}})
        events.append({"ph": "X", "pid": gpu, "tid": 3, "ts": ts, "dur": dur, "name": name, "args": {}})
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    return str(path)


def test_idle_time_is_the_gaps_in_the_union_of_streams(tmp_path):
    """Two steps; a copy on a second stream overlaps a kernel and fills part of a gap; a kernel
    nested inside another (a thunk's span) adds no idle time. Idle = the uncovered time between the
    first and the last operation, named by the operations on either side."""
    kernels = []
    for step in range(2):
        t = 1000 * step
        kernels += [
            (1, "gemm", t, 300),
            (1, "gated_delta_rule_wy", t + 300, 50),
            (1, "inner", t + 310, 20),  # nested in the Pallas kernel's span
            (1, "loop_add_fusion", t + 400, 100),  # 50 µs after the Pallas kernel
        ]
    kernels.append((2, "memcpy", 550, 250))  # on the copy stream: covers 550..800 of the gap 500..1000
    summary = summarize(_trace(tmp_path, kernels), steps=2)
    # step 0: 350..400 (wy -> fusion), 500..550 (fusion -> memcpy), 800..1000 (memcpy -> gemm);
    # step 1: 1350..1400 (wy -> fusion)
    assert summary.idle_us == 50 + 50 + 200 + 50
    assert summary.gaps == (
        Gap("memcpy", "gemm", 1, 200),
        Gap("gated_delta_rule_wy", "loop_add_fusion", 2, 100),
        Gap("loop_add_fusion", "memcpy", 1, 50),
    )
    table = format_table(summary)
    assert "device idle between operations: 0.17 ms per step" in table  # 350 µs over 2 steps
    assert "gated_delta_rule_wy -> loop_add_fusion" in table
    as_json = summary.as_json()
    assert as_json["idle_ms_per_step"] == 0.175
    assert as_json["top_gaps"][0] == {"before": "memcpy", "after": "gemm", "count": 1, "ms_per_step": 0.1}


def test_back_to_back_kernels_have_no_idle_time(tmp_path):
    kernels = [(1, f"k{i}", 10 * i, 10) for i in range(20)] + [(2, "copy", 5, 190)]
    summary = summarize(_trace(tmp_path, kernels), steps=1)
    assert summary.idle_us == 0 and summary.gaps == ()
    assert summary.total_us > 0


def test_overlapping_launches_count_once(tmp_path):
    """A kernel that starts before the previous one ends (programmatic dependent launch) takes only
    the overlap from it: the self times add up to the busy time of the stream, not less."""
    kernels = [(1, "a", 0, 100), (1, "b", 90, 100), (1, "c", 180, 50), (1, "thunk", 300, 100), (1, "inner", 320, 30)]
    summary = summarize(_trace(tmp_path, kernels), steps=1)
    assert {k.name: k.us for k in summary.kernels} == {"a": 90, "b": 90, "c": 50, "thunk": 70, "inner": 30}
    assert summary.total_us == 230 + 100  # busy 0..230 and 300..400
    assert summary.idle_us == 70 and summary.gaps == (Gap("c", "thunk", 1, 70),)


def test_self_times_charge_each_instant_to_the_innermost_event(tmp_path):
    """Overlapping kernels inside an enclosing span: every instant counts once, for the event that
    started last among those covering it, so the self times add up to the busy time."""
    kernels = [(1, "thunk", 0, 100), (1, "a", 0, 60), (1, "b", 55, 45)]
    kernels += [(1, "P", 200, 100), (1, "A", 210, 40), (1, "B", 240, 40)]
    summary = summarize(_trace(tmp_path, kernels), steps=1)
    want = {"thunk": 0, "a": 55, "b": 45, "P": 30, "A": 30, "B": 40}
    assert {k.name: k.us for k in summary.kernels} == want
    assert summary.total_us == 200


def test_cpu_idle_is_per_device(tmp_path):
    """A CPU trace: each device's idle time on its own (one device waits while the other works)."""
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}}]
    for device, ts, dur in [(0, 0, 10), (0, 90, 10), (1, 0, 100)]:
        args = {"hlo_op": "dot.1", "device_ordinal": device}
        events.append({"ph": "X", "pid": 1, "tid": 7 + device, "ts": ts, "dur": dur, "name": "dot.1", "args": args})
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    summary = summarize(str(path), steps=1)
    assert summary.devices == 2 and summary.idle_us == 80


def test_exposed_collectives_are_those_with_nothing_beside_them(tmp_path):
    """An all-reduce on its own stream: the part beside a matmul or fusion is hidden, the rest (and a
    second one after the compute ends) is exposed; compute-only traces report none."""
    kernels = [
        (1, "nvjet_gemm", 0, 100),
        (1, "loop_add_fusion", 100, 50),
        (2, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 120, 60),  # 120..150 hidden, 150..180 exposed
        (2, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 200, 40),  # alone: exposed
        (1, "gemm_fusion_dot", 240, 60),
    ]
    summary = summarize(_trace(tmp_path, kernels), steps=1)
    assert summary.by_category["collectives"] == 100
    assert summary.exposed_collectives_us == 30 + 40
    table = format_table(summary)
    assert "collectives with nothing else running on the device: 0.07 ms per step of 0.10" in table
    assert summary.as_json()["exposed_collectives_ms_per_step"] == 0.07
    compute_only = summarize(_trace(tmp_path, kernels[:2] + kernels[4:]), steps=1)
    assert compute_only.exposed_collectives_us == 0
    assert "collectives with nothing else" not in format_table(compute_only)
