"""Figures of influence results (matplotlib, no display needed)."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from untrac_ray.results.scoring import pearson  # noqa: E402
from untrac_ray.results.tables import (  # noqa: E402
    by_mean_influence,
    matrix,
    method_title,
    point_label,
)

VALUE_LABELS = {
    "graddot": "gradient dot product", "gradcos": "gradient cosine",
    "tracin": "sum over checkpoints of lr x dot", "ekfac": "influence-function score",
}


def heatmap(table: pd.DataFrame, method: str, train: list[str], test: list[str]):
    """Train x test heatmap at the method's last point, diverging colours centred at zero; the
    training sets from the largest mean influence down, as `show` prints them."""
    mat = matrix(table, method, train=train, test=test)
    attrs = mat.attrs
    mat = by_mean_influence(mat)
    train = [str(t) for t in mat.index]
    values = mat.to_numpy(dtype=float)
    bound = float(np.nanmax(np.abs(values))) or 1.0
    fig, ax = plt.subplots(figsize=(3.2 + 1.1 * len(test), 1.6 + 0.55 * len(train)))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(test)), test, rotation=30, ha="right")
    ax.set_yticks(range(len(train)), train)
    ax.set_xlabel("test set")
    ax.set_ylabel("training set")
    if values.size <= 150:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                strong = abs(values[i, j]) > 0.6 * bound
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8,
                        color="white" if strong else "black")
    where = point_label(attrs["point"], attrs["steps"])
    ax.set_title(f"{method_title(method)} influence"
                 + (f"\nat {where}" if where else ""))
    fig.colorbar(image, ax=ax, label=VALUE_LABELS.get(method, "loss after - loss before"))
    fig.tight_layout()
    fig.heatmap_values = values  # the exact array drawn, for checks
    fig.heatmap_rows = train  # its training sets, top to bottom
    return fig


def trajectory(table: pd.DataFrame, method: str, train: list[str], test: list[str]):
    """Influence along unlearning: one panel per test set, a line per training set, against
    the evaluation points (the same progress through each set's own schedule:
    methods/schedule.py)."""
    rows = table[table["method"] == method]
    cols = min(3, len(test))
    nrows = math.ceil(len(test) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 1.8, 3.2 * nrows + 0.5),
                             squeeze=False, layout="constrained")
    for ax, test_set in zip(axes.flat, test, strict=False):
        part = rows[rows["test_set"] == test_set]
        for train_set in train:
            line = part[part["train_set"] == train_set].sort_values("point")
            points = [0, *line["point"]]  # every trajectory starts at the base model: zero
            last = int(line["step"].max()) if len(line) else 0
            label = f"{train_set} ({last} steps)" if method == "untrac" else train_set
            ax.plot(points, [0.0, *line["influence"]], marker="o", markersize=3, label=label)
        ax.axhline(0, color="grey", linewidth=0.8)
        title = f"test set: {test_set}"
        if method == "untrac_inv" and len(part):
            title += f" ({int(part['step'].max())} steps)"
        ax.set_title(title)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("evaluation point (progress through each set's own steps)")
        ax.set_ylabel("influence")
    for ax in list(axes.flat)[len(test):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="training set", loc="outside right center")
    fig.suptitle(f"{method_title(method)}: influence along unlearning")
    return fig


LABEL_OFFSETS = ((4, 4, "left", "bottom"), (4, -4, "left", "top"),
                 (-4, 4, "right", "bottom"), (-4, -4, "right", "top"))


def _place_labels(fig, ax, labels: list) -> None:
    """Move each label to the first of four spots around its point where it overlaps no
    earlier label and stays inside the axes; hide it where none is free (greedy, in order)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    kept = []
    for text in labels:
        for dx, dy, ha, va in LABEL_OFFSETS:
            text.set_position((dx, dy))
            text.set_ha(ha)
            text.set_va(va)
            box = text.get_window_extent(renderer)
            fits = (inside.x0 <= box.x0 and box.x1 <= inside.x1
                    and inside.y0 <= box.y0 and box.y1 <= inside.y1)
            if fits and not any(box.overlaps(k) for k in kept):
                kept.append(box)
                break
        else:
            text.set_visible(False)


def scatter_vs_truth(estimate: pd.DataFrame, truth: pd.DataFrame, method: str):
    """An estimate against the ground truth: one point per (training set, test set) cell,
    x the ground truth, y the estimate, coloured by test set, Pearson r over all cells.

    `estimate` and `truth` are train x test matrices (truth is aligned to the estimate).
    The figure carries `scatter_points` (train_set, test_set, truth, estimate) and `pearson`.
    """
    truth = truth.reindex(index=estimate.index, columns=estimate.columns)
    points = pd.DataFrame(
        [(str(tr), str(te), float(truth.loc[tr, te]), float(estimate.loc[tr, te]))
         for te in estimate.columns for tr in estimate.index],
        columns=["train_set", "test_set", "truth", "estimate"],
    )
    valid = points.dropna(subset=["truth", "estimate"])
    x, y = valid["truth"].to_numpy(), valid["estimate"].to_numpy()
    r = pearson(x, y)
    name = method_title(method)

    fig, ax = plt.subplots(figsize=(7.2, 4.8), layout="constrained")
    if len(x) and x.min() <= 0 <= x.max():  # zero lines only where the data cross zero
        ax.axvline(0, color="lightgrey", linewidth=0.8, zorder=0)
    if len(y) and y.min() <= 0 <= y.max():
        ax.axhline(0, color="lightgrey", linewidth=0.8, zorder=0)
    tests = list(dict.fromkeys(points["test_set"]))
    cmap = plt.get_cmap("tab10" if len(tests) <= 10 else "tab20")
    for j, test_set in enumerate(tests):
        part = valid[valid["test_set"] == test_set]
        ax.scatter(part["truth"], part["estimate"], s=40, color=cmap(j % cmap.N),
                   edgecolor="white", linewidth=0.6, label=test_set, zorder=3)
    if r == r:  # a least-squares line when the correlation is defined
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, slope * xs + intercept, "--", color="grey", linewidth=1, zorder=2)
    ax.margins(0.15)
    labels = []
    if len(valid) <= 24:  # name the training set of each point, where it fits
        for row in valid.itertuples():
            labels.append(ax.annotate(row.train_set, (row.truth, row.estimate),
                                      xytext=(4, 4), textcoords="offset points", fontsize=7,
                                      color="dimgrey"))
    ax.set_xlabel("ground truth: leave-dataset-out influence")
    ax.set_ylabel(f"estimate: {name} influence")
    r_text = f"{r:.3f}" if r == r else "n/a"
    where = point_label(estimate.attrs.get("point", 0), estimate.attrs.get("steps", []))
    ax.set_title(f"{name}{f' at {where}' if where else ''} vs leave-dataset-out\n"
                 f"Pearson r = {r_text} over {len(valid)} cells (dashed: least-squares fit)")
    fig.legend(loc="outside right upper", title="test set", fontsize=8)
    _place_labels(fig, ax, labels)
    fig.scatter_points = points  # the exact data drawn, for checks
    fig.pearson = r
    return fig
