"""How far to trust a run's answer, in a few lines: what `run`, `show` and the report end with.

Built only from what the run has: how well its estimates of the same cells agree (UnTrac
against UnTrac-Inv, an ensemble's seeds), and, when it has a ground truth (leave-dataset-out),
each estimate's mean Pearson at its point fixed in advance with a 95% interval; with LDS
(retraining on random subsets), each estimate's LDS with its bootstrap interval and ceiling.
The Pearson's interval is Fisher's for one test set's correlation over the training sets (n =
their number): with 4 to 8 training sets it is wide, and the verdict says so rather than
rounding a +0.9 up to "right".

The wording follows what the benchmarks measured (docs/benchmarks.md): agreement below
scoring.AGREEMENT_LOW went with inaccurate estimates, but agreement above it did not make them
accurate (on dataset A, UnTrac and UnTrac-Inv agreed at +0.9 and both missed leave-dataset-out);
no verdict claims more than that.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from untrac_ray.results.scoring import AGREEMENT_LOW, pearson_interval
from untrac_ray.results.tables import method_title

TRACKS = 0.5  # a lower bound above this: the estimate tracks retraining on this job
HOW_TO_CHECK = (
    "no ground truth in this run: to measure how far to trust it, retrain without each "
    "training set on a small proxy (a copy of the job with a small model.config and "
    "methods: {untrac: {}, ldo: {}}), run it, and `untrac-ray compare` its UnTrac with this "
    "run's; or give ground_truth.run_id of such a run")


class Line(str):
    """One line of the verdict, plain text; `warning` when it says the answer cannot be relied
    on as it stands (what `show`, `run` and the report draw in yellow)."""

    warning: bool

    def __new__(cls, text: str, warning: bool = False) -> Line:
        line = super().__new__(cls, text)
        line.warning = warning
        return line


def _label(key: str) -> str:
    if key == "untrac_vs_untrac_inv":
        return "UnTrac and UnTrac-Inv"
    if key.endswith("_seeds"):
        return f"{method_title(key.removesuffix('_seeds'))}'s seeds"
    return key


def _lds_line(r) -> Line | None:
    """An estimate's linear datamodeling score with its interval and ceiling, and what it
    means (results/lds.py); None when the run has no LDS."""
    value = float(getattr(r, "lds", float("nan")))
    if value != value:
        return None
    name, low, high = method_title(r.method), float(r.lds_low), float(r.lds_high)
    top = float(r.lds_ceiling)
    ceiling = f"; ceiling {top:+.2f} from the seed noise" if top == top else ""
    if low > TRACKS:
        call, warning = "predicts retraining on subsets of the training sets", False
    elif value > TRACKS:
        call, warning = "probably predicts retraining on subsets, but the interval is wide", True
    else:
        call, warning = "does not predict retraining on subsets here", True
    return Line(f"{name}: LDS {value:+.2f}, 95% interval [{low:+.2f}, {high:+.2f}] over "
                f"{int(r.lds_n)} retrained subsets{ceiling}: {call}", warning)


def verdict(agreement: Mapping[str, float], summary: pd.DataFrame | None,
            n_train: int) -> list[Line]:
    """The verdict's lines: agreement, each estimate against the ground truth with its
    interval, and what that means; with no ground truth, how to get one."""
    lines = []
    for key, value in agreement.items():
        if value != value:
            continue
        if value < AGREEMENT_LOW:
            lines.append(Line(f"{_label(key)} disagree (Pearson {value:+.2f} over the cells): "
                              "treat both as uncertain", warning=True))
        else:
            lines.append(Line(f"{_label(key)} agree (Pearson {value:+.2f} over the cells); "
                              "agreement alone does not show they are right"))
    if summary is None or summary.empty:
        lines.append(Line(HOW_TO_CHECK))
        return lines
    for r in summary.itertuples():
        name = method_title(r.method)
        value = float(r.pearson_mean)
        lds = _lds_line(r)
        if lds is not None:
            lines.append(lds)
            if value != value:  # scored by LDS alone (no leave-dataset-out in the job)
                continue
        if value != value:
            lines.append(Line(f"{name}: no correlation with leave-dataset-out (constant)",
                              warning=True))
            continue
        interval = pearson_interval(value, n_train)
        span = (f", 95% interval [{interval[0]:+.2f}, {interval[1]:+.2f}] over {n_train} "
                "training sets" if interval else f" over only {n_train} training sets")
        if interval is not None and interval[0] > TRACKS:
            call, warning = "tracks retraining on this job", False
        elif value > TRACKS:
            call, warning = ("probably tracks retraining, but the interval is wide" if interval
                             else "too few training sets to tell"), True
        else:
            call, warning = "does not track retraining here: do not rank training sets by it", True
        lines.append(Line(f"{name} vs leave-dataset-out: Pearson {value:+.2f}{span}: {call}",
                          warning))
    return lines
