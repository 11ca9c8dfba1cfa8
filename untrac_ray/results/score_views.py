"""What every reader of the score table (results/scores.py) shows, made in one place: the
headline table of `run`, `show` and the report, the per-test-set table of `show`, the line of
`compare`, the MLflow metrics and a search's objective. None of them names a score or a
reference row: they come from the table and scores.SCORES, so a new score shows up in all of
them once scores.py computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from untrac_ray.results.scores import (
    CEILING,
    ESTIMATE,
    REFERENCE,
    SCORES,
    TRUTH,
)
from untrac_ray.results.scoring import ALL_CELLS, MEAN_OVER_TESTS
from untrac_ray.results.tables import method_title

_KIND_ORDER = {ESTIMATE: 0, TRUTH: 1, REFERENCE: 2, CEILING: 3}
ROW_NAMES = {MEAN_OVER_TESTS: "mean over test sets", ALL_CELLS: "all cells pooled"}


@dataclass
class ScoreTable:
    """A table to print: headers, rows of cells (a float is a correlation, None a blank, a
    str as it is), which rows are not estimates (drawn dim), and the lines below it."""

    headers: list[str]
    rows: list[list]
    kinds: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fmt(value) -> str:
    """A cell as text: correlations signed to 3 places, '-' for none."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:+.3f}"
    return str(value)


def interval(low: float, high: float) -> str | None:
    return None if low != low or high != high else f"[{low:+.2f}, {high:+.2f}]"


def headline_rows(frame: pd.DataFrame | None) -> pd.DataFrame:
    """The mean over test sets of every method and score at its headline point."""
    if frame is None or frame.empty:
        return pd.DataFrame()
    return frame[frame["headline"] & (frame["test_set"] == MEAN_OVER_TESTS)]


def scores_in(frame: pd.DataFrame | None) -> list[str]:
    """The scores a table holds, in SCORES' order."""
    if frame is None or frame.empty:
        return []
    present = set(frame["score"])
    return [s for s in SCORES if s in present]


def _order(top: pd.DataFrame, by: str) -> list[str]:
    """Methods: estimates by `by` (best first), then the ground truth's own row, the
    references and the ceiling."""
    first = top.groupby("method", sort=False).agg(kind=("kind", "first"))
    value = top[top["score"] == by].set_index("method")["value"]
    first["value"] = value.reindex(first.index).fillna(-np.inf)
    first["order"] = first["kind"].map(_KIND_ORDER)
    return list(first.sort_values(["order", "value"], ascending=[True, False],
                                  kind="stable").index)


def best_point(frame: pd.DataFrame | None, method: str, score: str) -> tuple[int, float] | None:
    """The point with the best mean `score` of a method, and that value (hindsight: chosen on
    the ground truth it is scored against); None for a method with one point."""
    if frame is None or frame.empty:
        return None
    mean = frame[(frame["method"] == method) & (frame["score"] == score)
                 & (frame["test_set"] == MEAN_OVER_TESTS)].dropna(subset=["value"])
    if mean["point"].nunique() < 2:
        return None
    best = mean.loc[mean["value"].idxmax()]
    return int(best["point"]), float(best["value"])


def summary_table(frame: pd.DataFrame | None) -> ScoreTable | None:
    """Method x score at each method's point fixed in advance: value, interval and paired lead
    over the reference rows for each score, the point, the best point in hindsight."""
    top = headline_rows(frame)
    names = scores_in(frame)
    if top.empty or not names:
        return None
    primary = names[0]
    with_interval = [s for s in names if SCORES[s].interval]
    headers = ["method"]
    for s in names:
        headers.append(SCORES[s].title)
        if s in with_interval:
            headers += [f"95% interval ({SCORES[s].title})",
                        f"above references ({SCORES[s].title})"]
    headers += ["at point", f"best point, hindsight ({SCORES[primary].title})"]
    rows, kinds = [], []
    for method in _order(top, primary):
        mine = top[top["method"] == method].set_index("score")
        row: list = [method_title(method)]
        for s in names:
            r = mine.loc[s] if s in mine.index else None
            row.append(None if r is None else float(r["value"]))
            if s in with_interval:
                row.append(None if r is None else interval(r["low"], r["high"]))
                row.append(None if r is None or r["margin"] != r["margin"] else
                           f"{r['margin']:+.2f} {interval(r['margin_low'], r['margin_high'])}")
        kind = str(mine["kind"].iloc[0])
        point = int(mine["point"].iloc[0])
        row.append(str(point) if kind == ESTIMATE and point else "-")
        best = best_point(frame, method, primary) if kind == ESTIMATE else None
        row.append(f"{best[1]:+.3f} @ {best[0]}" if best else "-")
        rows.append(row)
        kinds.append(kind)
    return ScoreTable(headers, rows, kinds, _notes(top, names), _undefined(top))


def _notes(top: pd.DataFrame, names: list[str]) -> list[str]:
    out = []
    for s in names:
        kind = SCORES[s]
        n = int(top.loc[(top["score"] == s) & (top["kind"] == ESTIMATE), "n"].max()
                if ((top["score"] == s) & (top["kind"] == ESTIMATE)).any()
                else top.loc[top["score"] == s, "n"].max())
        how = f" ({kind.interval} 95% interval)" if kind.interval else ""
        out.append(f"{kind.title}: mean over test sets of the {kind.over.format(n=n)}, against "
                   f"{kind.truth}{how}, at the point fixed in advance (the last, or "
                   "score_point)")
    out.append("above references: the lead over the better of constant cells and random cells "
               "(the floor an estimate that knows nothing reaches), with a paired bootstrap "
               "95% interval on the same resampled points; the best point in hindsight is "
               "chosen on the ground truth itself, so it flatters")
    return out


def _undefined(top: pd.DataFrame) -> list[str]:
    out = []
    for r in top.itertuples():
        if r.undefined and isinstance(r.undefined, str):
            out.append(f"{method_title(r.method)}: {SCORES[r.score].title} undefined on test "
                       f"set(s) {r.undefined.replace(',', ', ')} (a constant ground truth or "
                       "missing cells); the mean is over the other test sets")
    return out


def per_test_table(frame: pd.DataFrame | None, method: str, point: int) -> ScoreTable | None:
    """A method's scores at a point, per test set, their mean and all cells pooled."""
    if frame is None or frame.empty:
        return None
    part = frame[(frame["method"] == method) & (frame["point"] == point)]
    if part.empty:
        return None
    names = [s for s in SCORES if s in set(part["score"])]
    wide = part.pivot_table(index="test_set", columns="score", values="value", sort=False,
                            dropna=False)
    special = {MEAN_OVER_TESTS: 1, ALL_CELLS: 2}
    order = sorted(wide.index, key=lambda t: special.get(t, 0))
    rows = [[ROW_NAMES.get(t, str(t)), *[float(wide.loc[t, s]) if s in wide else None
                                         for s in names]] for t in order]
    top = part[part["test_set"] == MEAN_OVER_TESTS]
    return ScoreTable(["test set", *[SCORES[s].title for s in names]], rows,
                      warnings=_undefined(top))


def describe(frame: pd.DataFrame | None, method: str) -> str | None:
    """A method's headline scores in one line ("Pearson +0.80 [..]; LDS +0.70 [..], above
    references by ..., at point 3"), for `compare`; None when its run has none."""
    top = headline_rows(frame)
    if top.empty:
        return None
    mine = top[top["method"] == method]
    if mine.empty:
        return None
    parts = []
    for s in scores_in(mine):
        r = mine[mine["score"] == s].iloc[0]
        text = f"{SCORES[s].title} {fmt(float(r['value']))}"
        if interval(r["low"], r["high"]):
            text += f" {interval(r['low'], r['high'])}"
        if r["margin"] == r["margin"]:
            text += (f", above references by {r['margin']:+.2f} "
                     f"{interval(r['margin_low'], r['margin_high'])}")
        parts.append(text + f" (n={int(r['n'])})")
    return "; ".join(parts) + f", at point {int(mine['point'].iloc[0])}"


def metric_points(frame: pd.DataFrame | None) -> list[tuple[str, str, float, int]]:
    """The table as MLflow metrics: (method, name, value, step). `<score>_mean`, `_all` and
    `_<test set>` at every point (the step); at the headline point, `<score>` itself, its
    `_low`/`_high` and `_margin`/`_margin_low`/`_margin_high`, so that the latest value of
    score/<method>/<score> is the headline's."""
    out = []
    if frame is None or frame.empty:
        return out
    for r in frame.itertuples():
        suffix = {MEAN_OVER_TESTS: "mean", ALL_CELLS: "all"}.get(r.test_set, r.test_set)
        if r.value == r.value:
            out.append((r.method, f"{r.score}_{suffix}", float(r.value), int(r.point)))
        if r.headline and r.test_set == MEAN_OVER_TESTS:
            for name, value in ((r.score, r.value), (f"{r.score}_low", r.low),
                                (f"{r.score}_high", r.high), (f"{r.score}_margin", r.margin),
                                (f"{r.score}_margin_low", r.margin_low),
                                (f"{r.score}_margin_high", r.margin_high)):
                if value == value:
                    out.append((r.method, name, float(value), int(r.point)))
    return out


def headline_values(frame: pd.DataFrame | None, score: str) -> dict[str, float]:
    """Each estimate's headline mean `score` (for the runs list's headline tag)."""
    top = headline_rows(frame)
    if top.empty:
        return {}
    part = top[(top["score"] == score) & (top["kind"] == ESTIMATE)]
    return {str(r.method): float(r.value) for r in part.itertuples() if r.value == r.value}


def latest_values(frame: pd.DataFrame, score: str, test_set: str) -> dict[str, float]:
    """Each estimate's `score` on `test_set` at its last point (a search's objective: the
    round's newest cells)."""
    part = frame[(frame["score"] == score) & (frame["test_set"] == test_set)
                 & (frame["kind"] == ESTIMATE)]
    out = {}
    for method, rows in part.groupby("method", sort=False):
        out[str(method)] = float(rows.sort_values("point")["value"].iloc[-1])
    return out
