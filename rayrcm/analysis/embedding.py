"""A 2-D map of an encoder's test features, coloured by class: t-SNE from scikit-learn.

solo-learn draws UMAP maps of the validation features during pretraining; here t-SNE
(:class:`sklearn.manifold.TSNE`, cosine distance on the features, PCA initialisation, perplexity
min(30, (N - 1) / 3)) gives the same picture without another dependency. The coordinates are
written next to the plot (``embedding.csv``: x, y, label) so it can be redrawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch

PLOT_FILE, COORDS_FILE = "embedding.png", "embedding.csv"


def tsne_2d(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """``(N, 2)`` t-SNE coordinates of ``features`` ``(N, d)`` (N >= 4)."""
    from sklearn.manifold import TSNE

    x = features.detach().float().cpu().numpy()
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    return cast(np.ndarray, TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed).fit_transform(x))


def write_embedding(features: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, *, title: str,
                    seed: int = 0) -> list[Path]:
    """Write ``embedding.png`` and ``embedding.csv`` of ``features`` to ``out_dir``; returns the paths
    (none when there are fewer than 4 points)."""
    if len(features) < 4:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = tsne_2d(features, seed)
    y = labels.detach().cpu().numpy()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "label": y}).to_csv(out / COORDS_FILE, index=False)
    fig, ax = plt.subplots(figsize=(6, 6))
    classes = np.unique(y)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i % cmap.N), label=str(c) if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best", title="class")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / PLOT_FILE, dpi=120)
    plt.close(fig)
    return [out / PLOT_FILE, out / COORDS_FILE]
