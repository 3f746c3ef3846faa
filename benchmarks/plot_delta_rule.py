"""docs/delta_rule.png: Gated DeltaNet on one H200 beside jax-linear-attention, from committed results
(``--op kda``: docs/kda.png, KDA's).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/plot_delta_rule.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/plot_delta_rule.py --op kda

Left: forward and forward+backward time at the issue's three shapes (``benchmarks/delta_rule.py``,
both contenders in the same run, ``--json``). Right: device time by kernel at (1, 32768, 16, 128),
ours from a ``delta_rule_sweep.py --profile`` row (JSON), jax-linear-attention's from the
``DELTA_RULE_PROFILE`` listing in a ``delta_rule.py`` log (the fwd+bwd block of that shape; KDA:
none was recorded, so ours alone). Nothing runs on a GPU here; the arguments name the files
(defaults: session 24's op rows for both, its profile for GDN, session 23's for KDA).
"""

from __future__ import annotations

import argparse
import json
import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
S14 = os.path.join(RESULTS, "2026-12-01_H200_s14")
S23 = os.path.join(RESULTS, "2026-12-02_H200_s23")
S24 = os.path.join(RESULTS, "2026-12-02_H200_s24")
DEFAULTS = {  # --op: (op JSON, sweep JSON, sweep label, peer log or None, output, title, profile note)
    "gdn": (
        os.path.join(S24, "callD", "delta_gdn.json"),
        os.path.join(S24, "callE", "gdn_profile.json"),
        "default",  # the bf16 default of session 24 (the inverse on bf16 operands)
        os.path.join(RESULTS, "2026-12-01_H200_s13", "delta_op_f.log"),
        "delta_rule.png",
        "Gated DeltaNet",
        "ours session 24, jla session 13",
    ),
    "kda": (
        os.path.join(S24, "callD", "delta_kda.json"),
        os.path.join(S23, "callA", "kda_32_rows_from_log.json"),
        "output_rows=32,wy_bwd_rows=32",  # session 23's default (session 24's KDA profile came back empty)
        None,
        "kda.png",
        "KDA (mild gates)",
        "session 23, before the bf16 inverse",
    ),
}


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
    ap.add_argument("--op", default="gdn", choices=sorted(DEFAULTS))
    ap.add_argument("--op-json", default=None)
    ap.add_argument("--sweep-json", default=None)
    ap.add_argument("--sweep-label", default=None)
    ap.add_argument("--peer-log", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    op_json, sweep_json, sweep_label, peer_log, out_name, title, note = DEFAULTS[args.op]
    op_json, sweep_json = args.op_json or op_json, args.sweep_json or sweep_json
    sweep_label, peer_log = args.sweep_label or sweep_label, args.peer_log or peer_log
    out = args.out or os.path.join(os.path.dirname(RESULTS), "..", "docs", out_name)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = op_rows(op_json, args.op)
    ours = our_kernels(sweep_json, sweep_label)
    stacks = [("lasp-jax (Pallas Triton)", ours)]
    if peer_log:
        stacks.append(("jla (Mosaic GPU)", peer_kernels(peer_log)))
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
    left.set_title(f"{title}, H=16, D=E=128, one H200")
    left.legend(fontsize=8)

    for x, (_, kernels) in enumerate(stacks):
        bottom = 0.0
        small = 0.03 * sum(kernels.values())  # slices too thin for a label: summed in the legend line
        for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
            right.bar(x, ms, 0.6, bottom=bottom, edgecolor="white")
            if ms >= small:
                right.text(x, bottom + ms / 2, f"{kernel} {ms:.2f}", ha="center", va="center", fontsize=7)
            bottom += ms
        rest = {k: ms for k, ms in kernels.items() if ms < small}
        if rest:
            right.text(x + 0.32, bottom, " + ".join(f"{k} {ms:.2f}" for k, ms in rest.items()), fontsize=6, va="top")
        right.text(x, bottom, f"{bottom:.2f} ms", ha="center", va="bottom", fontsize=8)
    right.set_xticks(list(range(len(stacks))), [name for name, _ in stacks])
    right.set_xlim(-0.75, len(stacks) - 0.25)
    right.set_ylabel("device ms per fwd+bwd")
    right.set_title(f"by kernel, (1, 32768, 16, 128)\n({note})", fontsize=10)
    fig.tight_layout()
    out = os.path.normpath(out)
    fig.savefig(out, dpi=110)
    totals = ", ".join(f"{name} {sum(kernels.values()):.2f} ms" for name, kernels in stacks)
    print(f"wrote {out}: by kernel {totals}")


if __name__ == "__main__":
    main()
