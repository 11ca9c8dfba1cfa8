"""Figures of influence results (matplotlib, no display needed)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from untrac_ray.results import matrix  # noqa: E402

METHOD_TITLES = {"untrac": "UnTrac", "untrac_inv": "UnTrac-Inv"}


def heatmap(table: pd.DataFrame, method: str, train: list[str], test: list[str]):
    """Train x test heatmap at the method's last step, diverging colours centred at zero."""
    mat = matrix(table, method, train=train, test=test)
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
    ax.set_title(f"{METHOD_TITLES.get(method, method)} influence (step {mat.attrs['step']})")
    fig.colorbar(image, ax=ax, label="loss after - loss before")
    fig.tight_layout()
    fig.heatmap_values = values  # the exact array drawn, for checks
    return fig


def trajectory(table: pd.DataFrame, method: str, train: list[str], test: list[str]):
    """Influence along the unlearning steps: one panel per test set, a line per training set."""
    rows = table[table["method"] == method]
    cols = min(3, len(test))
    nrows = math.ceil(len(test) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 1.8, 3.2 * nrows + 0.5),
                             squeeze=False, layout="constrained")
    for ax, test_set in zip(axes.flat, test, strict=False):
        part = rows[rows["test_set"] == test_set]
        for train_set in train:
            line = part[part["train_set"] == train_set].sort_values("step")
            steps = [0, *line["step"]]  # every trajectory starts at the base model: zero
            ax.plot(steps, [0.0, *line["influence"]], marker="o", markersize=3, label=train_set)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"test set: {test_set}")
        ax.set_xlabel("unlearning step")
        ax.set_ylabel("influence")
    for ax in list(axes.flat)[len(test):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="training set", loc="outside right center")
    fig.suptitle(f"{METHOD_TITLES.get(method, method)}: influence along unlearning")
    return fig
