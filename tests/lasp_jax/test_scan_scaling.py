"""What the scan sends, read from compiled HLO, and benchmarks/scaling.py's fake-mesh part and cost model.

On 8 devices (this process) and 64 (a subprocess): forward + backward compile to exactly the
expected collectives (ring 2(P−1) hops of one state, allgather 2 gathers of P states, scan
2⌈log2 P⌉ rounds), with the bytes the busiest rank sends; then the cost model's claims.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

_ROOT = pathlib.Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("scaling_benchmark", _ROOT / "benchmarks" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = scaling  # its dataclasses look their module up
_spec.loader.exec_module(scaling)

MEASURED = [
    _ROOT / "benchmarks" / "results" / "2026-11-22_2xH200_s3" / "sp.json",
    _ROOT / "benchmarks" / "results" / "2026-11-22_4xH200_s3" / "sp.json",
]


def assert_as_expected(rows):
    assert rows
    for row in rows:
        exp = row["expected"]
        got = {"count": row["count"], "operand_bytes": row["operand_bytes"], "max_rank_bytes": row["max_rank_bytes"]}
        assert got == exp, scaling._hlo_line(row)
        assert set(row["by_kind"]) == {"all-gather" if row["strategy"] == "allgather" else "collective-permute"}


def test_scan_hlo_on_8_devices():
    """3 rounds each way; with per-token g (and the delta rule's Φ) every round but the last sends
    the transition beside the state. (ring and allgather: test_communication.py.)"""
    (row,) = scaling.hlo_worker(8, ("delta_rule",), strategies=("scan",))["rows"]
    assert_as_expected([row])
    state = row["state_bytes"]  # Φ [B, Hv, D, D] has the state's bytes here (D = E)
    assert row["count"] == 6 and row["operand_bytes"] == 2 * (2 * 2 * state + state)
    # the busiest rank (3): 3 rounds forward (the first two with Φ), the first 2 backward (with Φ)
    assert row["max_rank_bytes"] == (2 * 2 + 1) * state + 2 * 2 * state


def test_every_strategy_hlo_on_64_devices():
    """P = 64 fake devices in a subprocess: ring 126 hops, allgather 2 gathers of 64 states, scan 12 rounds."""
    rows = scaling.run_hlo([64], ("g_gamma",))
    assert_as_expected(rows)
    by = {r["strategy"]: r for r in rows}
    state = by["scan"]["state_bytes"]
    assert by["ring"]["count"] == 126 and by["allgather"]["count"] == 2 and by["scan"]["count"] == 12
    # the busiest rank: 2 states (ring), 126 (allgather), 6 forward + 5 backward (scan)
    assert [by[s]["max_rank_bytes"] / state for s in ("ring", "allgather", "scan")] == [2, 126, 11]


def test_benchmark_smoke(tmp_path):
    """The script end to end on the CPU: (a) at P = 4 in a subprocess (per-token g: the scan sends
    log Γ beside the state), (b) the model, (c) its check against the committed 2- and 4-GPU rows, the plot."""
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    args = ["--smoke", "--families", "g", "--check", *map(str, MEASURED), "--plot", str(png), "--json", str(out)]
    results = scaling.main(args)
    assert png.stat().st_size > 0 and json.loads(out.read_text())["predicted"]
    assert_as_expected(results["hlo"])
    predicted = {(r["P"], r["strategy"]): r for r in results["predicted"]}
    # the target: at P = 64 the scan's exposed communication <= 1/4 of the ring's and the all-gather's
    scan64 = predicted[(64, "scan")]["exposed_comm_ms"]
    assert scan64 <= predicted[(64, "ring")]["exposed_comm_ms"] / 4
    assert scan64 <= predicted[(64, "allgather")]["exposed_comm_ms"] / 4
    # and within 15% of every measured row it is checked against
    assert len(results["checked"]) == 4
    for row in results["checked"]:
        assert abs(row["error"]) < 0.15, row


def test_cost_model_counts():
    """Hop and round counts of the model: the ring crosses P/8 − 1 node edges, the scan has ⌈log2 P⌉ rounds."""
    link = scaling.Link(1.0, 1.0, "unit")  # 1 µs + 1 µs per kB
    model = scaling.CostModel(ppermute=link, all_gather=link, inter_node=scaling.Link(10.0, 1.0, "slow"))
    assert model.ring(8, 0) == pytest.approx(2 * 7e-6)
    assert model.ring(32, 0) == pytest.approx(2 * (28 * 1e-6 + 3 * 10e-6))
    assert model.scan(8, 0) == pytest.approx(2 * 3e-6)
    assert model.scan(1024, 0) == pytest.approx(2 * 10 * 10e-6)


def test_measure_collectives_and_fit():
    """--measure-collectives' timing loop on the CPU devices (tiny sizes), then the fit it feeds."""
    measured = scaling.measure_collectives(sizes_mib=(1 / 64, 1 / 16), chain=2, reps=2, ranks=(2,))
    ops = {(r["op"], r["P"], r["bytes"]) for r in measured["rows"]}
    assert ops == {(op, 2, n) for op in ("ppermute", "all_gather") for n in (2**14, 2**16)}
    model = scaling.model_from_collectives(measured)
    assert "fitted" in model.ppermute.source and model.ppermute.latency_us >= 0
