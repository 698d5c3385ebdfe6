"""One PNG per results table: grouped bars of the table's metric."""

from __future__ import annotations


def plot_table(grid: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = grid["rows"], grid["cols"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.6 * len(cols) + 3)), 5))
    x = np.arange(len(cols))
    for i, row in enumerate(rows):
        vals = [grid["cell"].get((row, c)) for c in cols]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [v if isinstance(v, (int, float)) else 0 for v in vals],
               width, label=row)
    ax.set_xticks(x, cols, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(grid["metric"])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(5, len(rows)), loc="upper center", bbox_to_anchor=(0.5, -0.32))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
