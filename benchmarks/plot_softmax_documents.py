"""docs/softmax_sp_documents.png: each rank's block compute with packed documents, by document length.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/plot_softmax_documents.py

From ``benchmarks/softmax_rank_work.py --doc-len N --json`` files (session 16, one H200, call G):
the slowest rank's fwd+bwd block compute of the balanced allgather softmax layer (causal, H32 Hk8
D128 bf16, 32K tokens per rank) with documents of N tokens, for the Pallas blocks and for cuDNN block
pairs (``cudnn_blocks``, whose pairs with a document boundary in their queries run the Pallas
kernels), at sp = 2 and 4. Nothing runs on a GPU here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "2026-12-01_H200_s16", "callG")


def slowest_ms(paths: list[str]) -> dict[tuple[str, int], dict[int, float]]:
    """{(impl, sp): {document length: slowest rank ms}}."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        doc_len = data["args"]["doc_len"]
        for row in data["rows"]:
            if "rank_ms" in row:
                impl = row["what"].split(",")[0]
                out.setdefault((impl, row["sp"]), {})[doc_len] = row["ms"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="+", default=sorted(glob.glob(os.path.join(RESULTS, "rank_work_docs*.json"))))
    ap.add_argument("--out", default=os.path.join(RESULTS, "..", "..", "..", "..", "docs", "softmax_sp_documents.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = slowest_ms(args.json)
    names = {"pallas": "Pallas blocks", "cudnn_blocks": "cuDNN block pairs (auto under a mesh)"}
    styles = {2: "-", 4: "--"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.normpath(args.out)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
