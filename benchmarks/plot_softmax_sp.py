"""docs/softmax_sp.png and docs/softmax_sp_documents.png: the balanced softmax layer's per-rank block
compute, from ``benchmarks/softmax_rank_work.py --json`` files (one H200). Nothing runs on a GPU here.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/plot_softmax_sp.py

- ``softmax_sp.png`` (session 15): the slowest rank's block compute at each sp as a fraction of one
  GPU's cuDNN fwd+bwd on the whole sequence, for the Pallas blocks and for cuDNN block pairs (one
  call per chunk, and one per chunk pair as the rings cut it), beside the ideal 1/P and the issue's
  targets at sp=2. The layer on P GPUs adds its collectives on top.
- ``softmax_sp_documents.png`` (session 16, call G): the slowest rank's fwd+bwd block compute (causal,
  H32 Hk8 D128 bf16, 32K tokens per rank) with packed documents of N tokens (``--doc-len N``), for the
  Pallas blocks and for cuDNN block pairs (``cudnn_blocks``, whose pairs with a document boundary in
  their queries run the Pallas kernels), at sp = 2 and 4.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DOCS = os.path.join(os.path.dirname(RESULTS), "..", "docs")


def ratios(paths: list[str]) -> dict[str, dict[int, float]]:
    """{row label: {sp: slowest rank / one device}} over the files (later files win)."""
    out: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                if "x_one_device" in row:
                    out.setdefault(row["what"], {})[row["sp"]] = row["x_one_device"]
    return out


def slowest_ms(paths: list[str]) -> dict[tuple[str, int], dict[int, float]]:
    """{(impl, sp): {document length: slowest rank ms}} from ``--doc-len`` runs."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for row in data["rows"]:
            if "rank_ms" in row:
                impl = row["what"].split(",")[0]
                out.setdefault((impl, row["sp"]), {})[data["args"]["doc_len"]] = row["ms"]
    return out


def plot_sp(ax, paths: list[str]) -> None:
    rows = ratios(paths)
    labels = {
        "pallas": "Pallas blocks",
        "cudnn_blocks": "cuDNN block pairs (allgather's cut)",
        "cudnn_blocks per chunk pair": "cuDNN, one call per chunk pair (rings' cut)",
    }
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


def plot_documents(ax, paths: list[str]) -> None:
    rows = slowest_ms(paths)
    names = {"pallas": "Pallas blocks", "cudnn_blocks": "cuDNN block pairs (auto under a mesh)"}
    styles = {2: "-", 4: "--"}
    for (impl, sp), points in sorted(rows.items()):
        xs = sorted(points)
        color = "tab:blue" if impl == "pallas" else "tab:orange"
        ax.plot(xs, [points[x] for x in xs], "o" + styles.get(sp, ":"), color=color, label=f"{names[impl]}, sp={sp}")
    ax.set_xscale("log", base=2)
    ticks = sorted({x for points in rows.values() for x in points})
    ax.set_xticks(ticks, [f"{x // 1024}K" for x in ticks])
    ax.set_xlabel("document length (tokens); a rank's half-shard is 16K")
    ax.set_ylabel("slowest rank's block compute, fwd+bwd (ms)")
    ax.set_title("Causal softmax with packed documents, H32 Hk8 D128 bf16, 32K tokens/rank (one H200)", fontsize=9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s15, s16 = os.path.join(RESULTS, "2026-12-01_2xH200_s15"), os.path.join(RESULTS, "2026-12-01_H200_s16")
    ap.add_argument(
        "--json",
        nargs="+",
        default=[os.path.join(s15, "callB", "rank_work.json"), os.path.join(s15, "callC", "rank_work_pairs.json")],
    )
    ap.add_argument("--out", default=os.path.join(DOCS, "softmax_sp.png"))
    ap.add_argument(
        "--documents-json", nargs="+", default=sorted(glob.glob(os.path.join(s16, "callG", "rank_work_docs*.json")))
    )
    ap.add_argument("--documents-out", default=os.path.join(DOCS, "softmax_sp_documents.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for plot, paths, out in ((plot_sp, args.json, args.out), (plot_documents, args.documents_json, args.documents_out)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        plot(ax, paths)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = os.path.normpath(out)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
