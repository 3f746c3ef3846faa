"""docs/softmax_sp.png: the balanced softmax layer's per-rank block compute against one cuDNN GPU.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/plot_softmax_sp.py

From ``benchmarks/softmax_rank_work.py --json`` files (session 15, one H200): the slowest rank's
block compute at each sp as a fraction of one GPU's cuDNN fwd+bwd on the whole sequence, for the
Pallas blocks and for cuDNN block pairs (one call per chunk, and one per chunk pair as the rings
cut it), beside the ideal 1/P and the issue's targets at sp=2. The layer on P GPUs adds its
collectives on top. Nothing runs on a GPU here.
"""

from __future__ import annotations

import argparse
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "2026-12-01_2xH200_s15")


def ratios(paths: list[str]) -> dict[str, dict[int, float]]:
    """{row label: {sp: slowest rank / one device}} over the files (later files win)."""
    out: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                if "x_one_device" in row:
                    out.setdefault(row["what"], {})[row["sp"]] = row["x_one_device"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--json",
        nargs="+",
        default=[
            os.path.join(RESULTS, "callB", "rank_work.json"),
            os.path.join(RESULTS, "callC", "rank_work_pairs.json"),
        ],
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(RESULTS), "..", "..", "docs", "softmax_sp.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ratios(args.json)
    labels = {
        "pallas": "Pallas blocks",
        "cudnn_blocks": "cuDNN block pairs (allgather's cut)",
        "cudnn_blocks per chunk pair": "cuDNN, one call per chunk pair (rings' cut)",
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sps = sorted({sp for r in rows.values() for sp in r})
    ax.plot(sps, [1 / sp for sp in sps], "k:", label="ideal 1/P")
    for key, name in labels.items():
        if key in rows:
            xs = sorted(rows[key])
            ax.plot(xs, [rows[key][x] for x in xs], "o-", label=name)
    ax.scatter([2, 2], [0.60, 0.65], marker="_", s=400, c=["tab:red", "tab:purple"], zorder=3)
    ax.annotate("targets at sp=2: 0.60 (allgather), 0.65 (rings)", (2, 0.65), (2.15, 0.80), fontsize=8)
    ax.set_xlabel("sp (GPUs)")
    ax.set_ylabel("slowest rank's block compute / one cuDNN GPU")
    ax.set_xticks(sps)
    ax.set_title("Causal softmax, H32 Hk8 D128 bf16, 32K tokens per GPU (one H200)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.normpath(args.out)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
