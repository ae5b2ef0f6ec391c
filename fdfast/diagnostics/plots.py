"""Paper-style figures of the diagnostics (matplotlib, Agg backend): each function writes one PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fdfast.io import atomic_path

MODEL_COLOURS = ["#1f5fa8", "#d1495b", "#2a9d8f", "#e9a03b"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                         "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 150})
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:  # the temp name has no suffix: say the format
        fig.savefig(tmp, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def plot_attention_distance(models: list[dict], path) -> Path:
    """Per-layer scatter of every head's mean attention distance (one panel per model, shared y axis).

    models: [{"label": str, "layers": [[px per head] per layer], "image_size": int}]
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    for k, (ax, m) in enumerate(zip(axes[0], models)):
        colour = MODEL_COLOURS[k % len(MODEL_COLOURS)]
        for layer, heads in enumerate(m["layers"], start=1):
            x = layer + rng.uniform(-0.12, 0.12, len(heads))  # jitter so overlapping heads stay visible
            ax.scatter(x, heads, s=14, color=colour, alpha=0.7, edgecolors="none",
                       label="one head" if layer == 1 else None)
        means = [float(np.mean(h)) for h in m["layers"]]
        ax.plot(range(1, len(means) + 1), means, color="0.25", lw=1, ls="--", label="mean over heads")
        ax.set_title(f"{m['label']} ({m['image_size']} px input)" if "image_size" in m else m["label"])
        ax.set_xlabel("layer (block depth)")
        ax.set_xticks(range(1, len(means) + 1, max(1, len(means) // 12)))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean attention distance (px)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][-1].legend(loc="lower right", frameon=False)
    fig.suptitle("Average attention distance of each head", y=1.02)
    return _save(fig, path)


def plot_head_diversity(models: list[dict], path) -> Path:
    """Two panels over depth: mean pairwise cosine similarity of the heads' maps, and the std of the
    heads' attention distances. models: [{"label", "similarity": [per layer], "distance_std": [per layer]}]
    """
    plt = _plt()
    fig, (ax_sim, ax_std) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for k, m in enumerate(models):
        colour = MODEL_COLOURS[k % len(MODEL_COLOURS)]
        layers = range(1, len(m["similarity"]) + 1)
        ax_sim.plot(layers, m["similarity"], "o-", ms=3.5, color=colour, label=m["label"])
        ax_std.plot(layers, m["distance_std"], "o-", ms=3.5, color=colour, label=m["label"])
    ax_sim.set(xlabel="layer (block depth)", ylabel="mean pairwise cosine similarity",
               title="Head similarity (1 = identical heads)", ylim=(0, 1.02))
    ax_std.set(xlabel="layer (block depth)", ylabel="std of head attention distance (px)",
               title="Spread of attention distance across heads")
    ax_std.set_ylim(bottom=0)
    for ax in (ax_sim, ax_std):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _layer_picks(n_layers: int, most: int) -> list[int]:
    if n_layers <= most:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (most - 1)) for i in range(most)})


def plot_attention_maps(query_maps: list[np.ndarray], full_maps: list[np.ndarray], layer_names: list[str],
                        query: tuple[int, int], image: np.ndarray | None, label: str, path,
                        max_layers: int = 12, max_heads: int = 12, full_layers: int = 3, full_heads: int = 4) -> Path:
    """Top: heads x layers grid of one query patch's attention over the patch grid (image 0).
    Bottom: the full patch-to-patch maps (N x N, mean over images) of a few heads in a few layers:
    diagonal bands are relative-position (local) heads, vertical stripes are column ("look at the same
    few tokens") heads.

    query_maps[l]: [H, rows, cols]; full_maps[l]: [H, M, M]; query: (row, col) of the query patch.
    """
    plt = _plt()
    layers = _layer_picks(len(query_maps), max_layers)
    n_heads = min(max(q.shape[0] for q in query_maps), max_heads)
    full_picks = _layer_picks(len(full_maps), full_layers)
    n_full = min(full_heads, min(full_maps[l].shape[0] for l in full_picks))
    n_bottom = len(full_picks) * n_full + 1
    n_cols = max(len(layers), n_bottom)  # one panel width, top and bottom
    top_h, bottom_h = 1.1 * n_heads + 0.5, 1.1 + 0.9
    fig = plt.figure(figsize=(1.1 * n_cols + 0.4, top_h + bottom_h))
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])
    axes = top.subplots(n_heads, n_cols, squeeze=False)
    for row in axes:
        for ax in row[len(layers):]:
            ax.axis("off")
    for r in range(n_heads):
        for c, l in enumerate(layers):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            maps = query_maps[l]
            if r >= maps.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(maps[r], cmap="magma", interpolation="nearest")
            ax.scatter([query[1]], [query[0]], marker="x", c="cyan", s=12, linewidths=0.8)
            if r == 0:
                ax.set_title(f"layer {l + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"head {r + 1}", fontsize=8)
    top.suptitle(f"{label}: attention of the query patch x (row {query[0]}, col {query[1]}) over the patch grid, "
                 "image 1 (each map on its own colour scale)", fontsize=9)
    axes = bottom.subplots(1, n_cols, squeeze=False, gridspec_kw={"wspace": 0.3})[0]
    for ax in axes[n_bottom:]:
        ax.axis("off")
    ax = axes[0]
    ax.axis("off")
    if image is not None:
        ax.imshow(image)
        h, w = image.shape[:2]
        rows, cols = query_maps[0].shape[1:]
        ax.scatter([(query[1] + 0.5) * w / cols], [(query[0] + 0.5) * h / rows], marker="x", c="red", s=30)
        ax.set_title("image 1, query x", fontsize=7)
    for i, l in enumerate(full_picks):
        for h in range(n_full):
            ax = axes[1 + i * n_full + h]
            ax.imshow(full_maps[l][h], cmap="viridis", interpolation="nearest")
            ax.set_title(f"layer {l + 1}, head {h + 1}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and h == 0:
                ax.set_ylabel("query patch", fontsize=7)
            ax.set_xlabel("key patch", fontsize=7)
    bottom.suptitle("Full patch-to-patch attention (mean over images): diagonal = relative-position heads, "
                    "vertical stripes = column heads", fontsize=9)
    return _save(fig, path)


def plot_landscape_1d(models: list[dict], path) -> Path:
    """Loss along one filter-normalised direction: raw (left) and its increase over the loss at the weights
    (right, where basins of models with different losses compare). models: [{"label", "alphas", "losses",
    "curvature", "loss_name"}]"""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, (ax_raw, ax_rise) = plt.subplots(1, 2, figsize=(8.6, 3.3))
    for k, m in enumerate(models):
        colour = MODEL_COLOURS[k % len(MODEL_COLOURS)]
        losses = np.asarray(m["losses"], dtype=float)
        centre = losses[np.argmin(np.abs(np.asarray(m["alphas"])))]
        ax_raw.plot(m["alphas"], losses, "o-", ms=3, color=colour, label=m["label"])
        ax_rise.plot(m["alphas"], losses - centre, "o-", ms=3, color=colour,
                     label=f"{m['label']} (curvature {m['curvature']:.3g})")
    name = models[0].get("loss_name", "loss")
    ax_raw.set(xlabel=r"step $\alpha$ along a filter-normalised direction", ylabel=name, title="Loss, 1-D slice")
    ax_rise.set(xlabel=r"step $\alpha$ along a filter-normalised direction",
                ylabel=r"$L(\alpha) - L(0)$", title="Increase over the loss at the weights")
    for ax in (ax_raw, ax_rise):
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_landscape_2d(models: list[dict], path) -> Path:
    """Contours of the loss on the plane of two filter-normalised directions, one panel (and colour scale)
    per model, as in Li et al. 2018. models: [{"label", "alphas", "betas", "losses", "loss_name"}]"""
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.7), squeeze=False)
    for ax, m in zip(axes[0], models):
        a, b = np.meshgrid(m["alphas"], m["betas"])
        z = np.asarray(m["losses"], dtype=float)
        finite = z[np.isfinite(z)]
        levels = np.linspace(finite.min(), finite.max(), 13) if finite.size and np.ptp(finite) > 0 else None
        filled = ax.contourf(a, b, z, levels=levels, cmap="viridis")
        if levels is not None:
            lines = ax.contour(a, b, z, levels=levels, colors="white", linewidths=0.5)
            ax.clabel(lines, lines.levels[::3], fontsize=6, fmt="%.3g")
        ax.plot([0], [0], marker="*", color="red", ms=10)
        ax.set(xlabel=r"direction 1, $\alpha$", ylabel=r"direction 2, $\beta$", title=m["label"])
        ax.set_aspect("equal")
        cbar = fig.colorbar(filled, ax=ax, shrink=0.85, format="%.3g")
        cbar.set_label(m.get("loss_name", "loss"))
    fig.suptitle("Loss landscape, 2-D slice along filter-normalised directions\n(red star: the model's weights)",
                 y=1.04)
    fig.tight_layout()
    return _save(fig, path)
