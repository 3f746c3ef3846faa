"""docs/delta_rule.png: Gated DeltaNet on one H200 beside jax-linear-attention, from committed results.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/plot_delta_rule.py

Left: forward and forward+backward time at the issue's three shapes (``benchmarks/delta_rule.py``,
both contenders in the same run, ``--json``). Right: device time by kernel at (1, 32768, 16, 128),
ours from a ``delta_rule_sweep.py --profile`` row (JSON), jax-linear-attention's from the
``DELTA_RULE_PROFILE`` listing in a ``delta_rule.py`` log (the fwd+bwd block of that shape).
Nothing runs on a GPU here; the arguments name the files (defaults: session 14's).
"""

from __future__ import annotations

import argparse
import json
import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
S14 = os.path.join(RESULTS, "2026-12-01_H200_s14")


def op_rows(path: str, op: str = "gdn") -> list[dict]:
    """``delta_rule.py --json`` rows of ``op`` that have both contenders."""
    with open(path) as f:
        return [r for r in json.load(f) if r["op"] == op and "fwd_ms" in r.get("project", {}) and "jla" in r]


def our_kernels(path: str, label: str) -> dict[str, float]:
    """ms per step of each Pallas kernel in a profiled sweep row (prefix ``gated_delta_rule_`` dropped)."""
    with open(path) as f:
        row = next(r for r in json.load(f)["rows"] if r["label"] == label)
    top = row["profile"]["top_kernels"]
    return {k["name"].removeprefix("gated_delta_rule_"): k["ms_per_step"] for k in top if k["category"] == "pallas"}


def peer_kernels(path: str, shape: str = "(1, 32768, 16, 128)") -> dict[str, float]:
    """jla's Mosaic GPU kernels (ms per call) in the fwd+bwd profile block of ``shape`` in a log."""
    out, inside = {}, False
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("  gdn ") and "device kernels per call" in line:
            inside = shape in line and "fwd+bwd" in line and not out
            continue
        m = re.match(r"\s+([0-9.]+) ms\s+×\d+\s+gdr_(\w+)_mosaic_gpu_kernel", line)
        if inside and m:
            out[m.group(2)] = float(m.group(1))
        elif inside and not line.startswith("       "):
            inside = False
    if not out:
        raise ValueError(f"no jla fwd+bwd profile of {shape} in {path}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op-json", default=os.path.join(S14, "delta_op_e.json"))
    ap.add_argument("--sweep-json", default=os.path.join(S14, "sweep_gdn_d.json"))
    ap.add_argument("--sweep-label", default="num_warps_output_bwd=4")  # the default since call D
    ap.add_argument("--peer-log", default=os.path.join(RESULTS, "2026-12-01_H200_s13", "delta_op_f.log"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(RESULTS), "..", "docs", "delta_rule.png"))
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = op_rows(args.op_json)
    ours, peer = our_kernels(args.sweep_json, args.sweep_label), peer_kernels(args.peer_log)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})

    labels = ["B={}, T={}K".format(r["shape"][0], r["shape"][1] // 1024) for r in rows]
    width, xs = 0.2, range(len(rows))
    bars = [
        ("lasp-jax fwd", [r["project"]["fwd_ms"] for r in rows], "#9ecae1"),
        ("lasp-jax fwd+bwd", [r["project"]["fwd_bwd_ms"] for r in rows], "#3182bd"),
        ("jla fwd", [r["jla"]["fwd_ms"] for r in rows], "#fdae6b"),
        ("jla fwd+bwd", [r["jla"]["fwd_bwd_ms"] for r in rows], "#e6550d"),
    ]
    for i, (name, values, color) in enumerate(bars):
        pos = [x + (i - 1.5) * width for x in xs]
        left.bar(pos, values, width, label=name, color=color)
        for p, v in zip(pos, values, strict=True):
            left.text(p, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    left.set_xticks(list(xs), labels)
    left.set_ylabel("ms (median, bf16)")
    left.set_title("Gated DeltaNet, H=16, D=E=128, one H200")
    left.legend(fontsize=8)

    for x, kernels in enumerate([ours, peer]):
        bottom = 0.0
        for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
            right.bar(x, ms, 0.6, bottom=bottom, edgecolor="white")
            right.text(x, bottom + ms / 2, f"{kernel} {ms:.2f}", ha="center", va="center", fontsize=7)
            bottom += ms
        right.text(x, bottom, f"{bottom:.2f} ms", ha="center", va="bottom", fontsize=8)
    right.set_xticks([0, 1], ["lasp-jax (Pallas Triton)", "jla (Mosaic GPU)"])
    right.set_ylabel("device ms per fwd+bwd")
    right.set_title("by kernel, (1, 32768, 16, 128)")
    fig.tight_layout()
    out = os.path.normpath(args.out)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: ours {sum(ours.values()):.2f} ms by kernel, jla {sum(peer.values()):.2f} ms")


if __name__ == "__main__":
    main()
