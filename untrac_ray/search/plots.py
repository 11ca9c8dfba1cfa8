"""Figures of a hyperparameter search: the objective against each searched setting, and a
heatmap of the objective over two settings (a grid search, or the sensitivity benchmark)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STATUS_STYLE = {  # marker face colour by trial status
    "completed": "tab:blue", "stopped early": "white", "failed": "tab:red",
}


def _numeric(values: pd.Series) -> bool:
    return bool(values.map(lambda v: isinstance(v, int | float) and not isinstance(v, bool))
                .all())


def objective_vs_settings(trials: pd.DataFrame, settings: list[str], objective: str,
                          log_scale: dict[str, bool] | None = None):
    """One panel per setting: each trial's objective against its value (categories for
    choices of strings); early-stopped trials hollow, the best trial starred."""
    log_scale = log_scale or {}
    cols = min(3, len(settings))
    rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False,
                             layout="constrained")
    finite = trials[np.isfinite(trials["objective"].astype(float))]
    best = finite["objective"].idxmax() if not finite.empty else None
    if best is not None and trials.attrs.get("mode") == "min":
        best = finite["objective"].idxmin()
    for ax, key in zip(axes.flat, settings, strict=False):
        values = trials[key]
        if _numeric(values.dropna()):
            x = values.astype(float)
            if log_scale.get(key):
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values}, key=str)
            x = values.map(lambda v, labels=labels: labels.index(str(v)))
            ax.set_xticks(range(len(labels)), labels)
        for status, colour in STATUS_STYLE.items():
            part = trials["status"] == status
            ax.scatter(x[part], trials.loc[part, "objective"], s=36, facecolors=colour,
                       edgecolors="tab:blue" if status != "failed" else "tab:red", label=status)
        if best is not None:
            ax.scatter([x[best]], [trials.loc[best, "objective"]], marker="*", s=180,
                       color="tab:orange", zorder=3, label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    shown = dict(zip(labels, handles, strict=True))
    axes.flat[0].legend(shown.values(), shown.keys(), fontsize=7, loc="best")
    fig.suptitle(f"{objective} of each trial")
    return fig


def objective_heatmap(grid: pd.DataFrame, title: str, label: str):
    """A heatmap of a table of objective values (rows x columns, e.g. learning rate x batch
    size), the values written in the cells; NaN cells (failed trials) left grey."""
    values = grid.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(2.4 + 1.0 * values.shape[1], 1.6 + 0.5 * values.shape[0]))
    masked = np.ma.masked_invalid(values)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    image = ax.imshow(masked, cmap=cmap, aspect="auto", vmin=-1 if np.nanmin(
        values, initial=0) < 0 else None, vmax=1 if np.nanmax(values, initial=0) <= 1 else None)
    ax.set_xticks(range(values.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(values.shape[0]), [str(i) for i in grid.index])
    ax.set_xlabel(str(grid.columns.name or ""))
    ax.set_ylabel(str(grid.index.name or ""))
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = "failed" if np.isnan(values[i, j]) else f"{values[i, j]:+.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(values[i, j]) and values[i, j] < 0.3
                    else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return fig
