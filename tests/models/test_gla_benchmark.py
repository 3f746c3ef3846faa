"""``benchmarks/kernels.py --decay channel`` end to end on the CPU at a tiny shape (the chunked XLA
op), so the GPU run of the per-channel rows does not fail on a typo; a peer that is not installed
is recorded as a failed row, not lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_benchmark_channel_rows_on_cpu(tmp_path):
    out = tmp_path / "channel.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--impls", "project", "jla", "--decay", "channel"]
    cmd += ["--impl", "xla", "--shapes", "1,40,2,16", "--warmup", "1", "--iters", "1", "--json", str(out)]
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["project"]["config"] == {"impl": "xla"} and rows["project"]["decay"] == "channel"
    assert rows["project"]["fwd_ms"] > 0 and rows["project"]["fwd_bwd_ms"] > 0, rows["project"]
    assert "error" in rows["jla"] and rows["jla"]["shape"] == [1, 40, 2, 16]  # not installed here, or refused
    assert "project [impl=xla]" in proc.stdout
