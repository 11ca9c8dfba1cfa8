"""What the browsing commands (`runs`, `show`, `compare`) compute, from tables already read out
of the tracking store (runs.py): matrices sorted by influence, the top training sets per test
set, scores against the ground truth, the drill-down examples, two matrices aligned and
correlated, and the same as tidy frames and JSON for scripts.

No MLflow and no printing here: everything takes DataFrames and run records and returns
DataFrames or JSON-ready dicts; cli/render.py draws them for a terminal.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from untrac_ray.inputs.errors import InputError
from untrac_ray.inputs.spec_sections import GROUND_TRUTH
from untrac_ray.results.score_views import per_test_table, summary_table
from untrac_ray.results.scoring import pearson, spearman
from untrac_ray.results.tables import by_mean_influence, point_label, points_of

if TYPE_CHECKING:
    from untrac_ray.results.runs import RunRecord


FORMATS = ("text", "csv", "json", "parquet")
METHOD_ORDER = ("untrac", "untrac_inv", "ldo")


class BrowseError(InputError):
    """A run, method or point asked for does not exist, or an output cannot be written."""


# --- small helpers -----------------------------------------------------------------------------


def _num(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become None, NumPy scalars Python ones."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _num(value)


def to_json(data: Any) -> str:
    """Strict JSON (no NaN) with 2-space indents."""
    return json.dumps(_jsonable(data), indent=2, allow_nan=False)


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: _num(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def fmt_corr(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:+.3f}"


def fmt_duration(seconds: float | None) -> str:
    """1h 02m, 3m 04s, 12.3s; - when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def fmt_time(ms: int | None) -> str:
    return "-" if not ms else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def shown_status(record: RunRecord) -> str:
    """MLflow's status, or STALE for a RUNNING run whose driver is gone or silent (killed:
    `run --resume` continues it)."""
    return "STALE" if record.stale else record.status


def duration_s(record: RunRecord, now_ms: int | None = None) -> float | None:
    """Run time in seconds; a running run counts until now (a stale one until its last
    heartbeat)."""
    if not record.start_ms:
        return None
    end = record.end_ms
    if not end and record.status == "RUNNING":
        beat = record.tags.get("untrac_ray.heartbeat", "")
        end = (int(float(beat) * 1000) if record.stale and beat.replace(".", "").isdigit()
               else now_ms or int(time.time() * 1000))
    return max(0.0, (end - record.start_ms) / 1000) if end else None


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)

# --- runs --------------------------------------------------------------------------------------


def best_of(record: RunRecord) -> tuple[str | None, float | None]:
    """The method whose headline correlation with the ground truth (at its point fixed in
    advance) is highest, and that correlation."""
    if not record.headline_pearson:
        return None, None
    method = max(record.headline_pearson, key=lambda m: record.headline_pearson[m])
    return method, record.headline_pearson[method]


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run, for scripts (csv, json, parquet)."""
    rows = []
    for r in records:
        best_method, best = best_of(r)
        rows.append({
            "run_id": r.run_id, "run_name": r.run_name, "experiment": r.experiment,
            "job": r.job, "methods": ",".join(r.methods), "model": r.model,
            "n_train": r.n_train, "n_test": r.n_test, "status": shown_status(r),
            "top_method": best_method, "headline_pearson": best,
            "start_time": fmt_time(r.start_ms), "duration_s": duration_s(r),
            "parent_run_id": r.parent_id,
        })
    columns = ["run_id", "run_name", "experiment", "job", "methods", "model", "n_train",
               "n_test", "status", "top_method", "headline_pearson", "start_time", "duration_s",
               "parent_run_id"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"n_train": "Int64", "n_test": "Int64", "headline_pearson": "float64",
                         "duration_s": "float64"})

# --- show --------------------------------------------------------------------------------------


@dataclass
class MatrixView:
    """One method's train x test matrix at one evaluation point, rows sorted by mean
    influence; `steps` are the absolute steps of its cells (sets of different sizes differ)."""

    method: str
    point: int
    points: list[int]
    steps: list[int]
    matrix: pd.DataFrame

    def where(self) -> str:
        """'point 3/8 (step 24)', or '' for a method without a trajectory."""
        return point_label(self.point, self.steps, max(self.points))


def methods_of(table: pd.DataFrame) -> list[str]:
    """The methods of an influence table, in a fixed order (UnTrac, UnTrac-Inv, LDO, ...)."""
    return sorted(dict.fromkeys(table["method"]), key=_method_key)


def _fmt_points(points: list[int]) -> str:
    if len(points) > 8:
        return f"{', '.join(map(str, points[:3]))}, ..., {', '.join(map(str, points[-3:]))}"
    return ", ".join(map(str, points))


def view(table: pd.DataFrame, method: str, point: int | None = None) -> MatrixView:
    """A method's matrix at an evaluation point (default: its last), rows sorted by mean
    influence."""
    if method not in set(table["method"]):
        raise BrowseError(f"the run has no results for method {method!r} "
                          f"(it has: {', '.join(methods_of(table))})")
    points = points_of(table, method)
    if point is None:
        point = points[-1]
    elif point not in points:
        raise BrowseError(f"method {method!r} has no point {point} "
                          f"(points: {_fmt_points(points)})")
    rows = table[(table["method"] == method) & (table["point"] == point)]
    train = list(dict.fromkeys(table["train_set"]))
    test = list(dict.fromkeys(table["test_set"]))
    mat = rows.pivot_table(index="train_set", columns="test_set", values="influence",
                           aggfunc="mean")
    mat = mat.reindex(index=[t for t in train if t in mat.index],
                      columns=[t for t in test if t in mat.columns])
    mat = by_mean_influence(mat)
    mat.index.name, mat.columns.name = "train_set", "test_set"
    steps = sorted(int(s) for s in rows["step"].unique())
    return MatrixView(method, int(point), points, steps, mat)


def pick_views(table: pd.DataFrame, method: str | None = None,
               point: int | None = None) -> list[MatrixView]:
    """The matrices `show` prints: the method asked for, or every method of the run.

    With a point and no method, the methods that recorded that point.
    """
    if table.empty:
        raise BrowseError("the run's influence table is empty")
    if method is not None:
        return [view(table, method, point)]
    methods = methods_of(table)
    if point is None:
        return [view(table, m) for m in methods]
    having = [m for m in methods if point in points_of(table, m)]
    if not having:
        known = "; ".join(f"{m}: {_fmt_points(points_of(table, m))}" for m in methods)
        raise BrowseError(f"no method of the run has point {point} (points: {known})")
    return [view(table, m, point) for m in having]


def top_k(v: MatrixView, k: int) -> pd.DataFrame:
    """Per test set, the k training sets with the largest influence (rank 1 = largest)."""
    rows = []
    for test_set in v.matrix.columns:
        col = v.matrix[test_set].dropna().sort_values(ascending=False, kind="stable")
        for rank, (train_set, value) in enumerate(col.head(k).items(), start=1):
            rows.append({"test_set": test_set, "rank": rank, "train_set": train_set,
                         "influence": float(value)})
    return pd.DataFrame(rows, columns=["test_set", "rank", "train_set", "influence"])


def cells_frame(views: list[MatrixView]) -> pd.DataFrame:
    """Every shown cell, tidy: method, point, train_set, test_set, influence, and its rank
    among the training sets of its test set (1 = most influential)."""
    frames = []
    for v in views:
        long = v.matrix.reset_index().melt(id_vars="train_set", var_name="test_set",
                                           value_name="influence")
        long["rank"] = (long.groupby("test_set")["influence"]
                        .rank(ascending=False, method="first").astype("Int64"))
        long.insert(0, "point", v.point)
        long.insert(0, "method", v.method)
        frames.append(long)
    out = pd.concat(frames, ignore_index=True)
    return out[["method", "point", "train_set", "test_set", "influence", "rank"]]


def examples_for(examples: pd.DataFrame, views: list[MatrixView], k: int,
                 n: int) -> pd.DataFrame:
    """The drill-down rows shown: per test set, its top-k training sets (by the shown matrix of
    the drill-down's method, else the first shown), their n highest-ranked examples."""
    if examples is None or examples.empty:
        return pd.DataFrame(columns=["method", "test_set", "train_set", "rank", "row", "text",
                                     "loss_change"])
    ref = next((v for v in views if v.method in set(examples["method"])), views[0])
    top = top_k(ref, k)
    parts = []
    for r in top.itertuples():
        part = examples[(examples["test_set"] == r.test_set)
                        & (examples["train_set"] == r.train_set)]
        parts.append(part.sort_values("rank").head(n))
    if not parts:
        return examples.iloc[0:0]
    out = pd.concat(parts, ignore_index=True)
    return out[["method", "test_set", "train_set", "rank", "row", "text", "loss_change"]]


def record_dict(record: RunRecord) -> dict:
    """A run record for JSON, with readable times and the duration."""
    out = asdict(record)
    out.pop("tags", None)
    out["start_time"] = fmt_time(record.start_ms)
    out["duration_s"] = duration_s(record)
    return out


def parse_agreement(tag: str | None) -> dict[str, float]:
    """The `untrac_ray.agreement` tag (name=value,...) as numbers."""
    out = {}
    for item in (tag or "").split(","):
        name, _, value = item.partition("=")
        if name and value:
            out[name] = float(value)
    return out


def show_json(record: RunRecord, views: list[MatrixView], k: int,
              scores: pd.DataFrame | None, examples: pd.DataFrame | None,
              want_examples: bool, n_examples: int) -> dict:
    """`show` for scripts: the run, each matrix with its top-k and scores, the examples."""
    matrices = []
    for v in views:
        part = per_test_table(scores, v.method, v.point)
        top = top_k(v, k)
        matrices.append({
            "method": v.method, "point": v.point, "points": v.points, "steps": v.steps,
            "train_sets": [str(t) for t in v.matrix.index],
            "test_sets": [str(t) for t in v.matrix.columns],
            "influence": [[_num(x) for x in row] for row in v.matrix.to_numpy(dtype=float)],
            "top": {str(t): _records(p.drop(columns="test_set"))
                    for t, p in top.groupby("test_set", sort=False)},
            "scores": None if part is None else _records(pd.DataFrame(
                part.rows, columns=part.headers)),
        })
    out: dict = {"run": record_dict(record), "matrices": matrices}
    summary = summary_table(scores)
    if summary is not None:
        out["scores"] = _records(pd.DataFrame(summary.rows, columns=summary.headers))
    if want_examples:
        out["examples"] = (None if examples is None or examples.empty
                           else _records(examples_for(examples, views, k, n_examples)))
    return out

# --- compare -----------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Two matrices on their shared cells, and how well they agree."""

    a: MatrixView
    b: MatrixView
    label_a: str
    label_b: str
    train: list[str]
    test: list[str]
    pearson: float
    spearman: float
    per_test: pd.DataFrame
    top1_agreement: int
    dropped: list[str]
    scores_a: str | None = None  # each side's headline scores (score_views.describe)
    scores_b: str | None = None


def default_method(methods: list[str], avoid: str | None = None) -> str | None:
    """The method to compare when none is named: an estimate (UnTrac first), not `avoid`."""
    ordered = sorted(methods, key=_method_key)
    for m in ordered:
        if m != avoid and m != GROUND_TRUTH:
            return m
    for m in ordered:
        if m != avoid:
            return m
    return None


def compare_methods(methods_a: list[str], methods_b: list[str], same_run: bool,
                    method: str | None, method_a: str | None,
                    method_b: str | None) -> tuple[str, str]:
    """Which method of each run to compare: named, else a default (for one run with itself,
    two different methods, e.g. UnTrac vs UnTrac-Inv)."""
    ma = method_a or method or default_method(methods_a)
    mb = method_b or method
    if mb is None:
        if same_run:
            mb = default_method(methods_b, avoid=ma)
        else:
            mb = ma if ma in methods_b else default_method(methods_b)
    if ma is None or mb is None:
        raise BrowseError("the run has a single method; compare it with another run, or name "
                          "the methods with --method-a/--method-b")
    return ma, mb


def compare_views(a: MatrixView, b: MatrixView, label_a: str, label_b: str) -> Comparison:
    """Align two matrices on their shared training and test sets and correlate them."""
    train = [t for t in a.matrix.index if t in b.matrix.index]
    test = [t for t in a.matrix.columns if t in b.matrix.columns]
    if not train or not test:
        raise BrowseError(
            f"the two matrices share no cells: A has training sets {list(a.matrix.index)} and "
            f"test sets {list(a.matrix.columns)}, B has {list(b.matrix.index)} and "
            f"{list(b.matrix.columns)}")
    dropped = sorted((set(a.matrix.index) | set(b.matrix.index)) - set(train)) + \
        sorted((set(a.matrix.columns) | set(b.matrix.columns)) - set(test))
    ma = a.matrix.loc[train, test].to_numpy(dtype=float)
    mb = b.matrix.loc[train, test].to_numpy(dtype=float)
    rows, agree = [], 0
    for j, t in enumerate(test):
        top_a = train[int(np.nanargmax(ma[:, j]))] if np.isfinite(ma[:, j]).any() else None
        top_b = train[int(np.nanargmax(mb[:, j]))] if np.isfinite(mb[:, j]).any() else None
        agree += int(top_a is not None and top_a == top_b)
        rows.append({"test_set": t, "pearson": pearson(ma[:, j], mb[:, j]),
                     "spearman": spearman(ma[:, j], mb[:, j]), "top_a": top_a, "top_b": top_b})
    return Comparison(
        a, b, label_a, label_b, train, test,
        pearson(ma.ravel(), mb.ravel()), spearman(ma.ravel(), mb.ravel()),
        pd.DataFrame(rows, columns=["test_set", "pearson", "spearman", "top_a", "top_b"]),
        agree, dropped,
    )


def compare_frame(c: Comparison) -> pd.DataFrame:
    """The shared cells, tidy: train_set, test_set, influence_a, influence_b."""
    rows = [{"train_set": tr, "test_set": te,
             "influence_a": float(c.a.matrix.loc[tr, te]),
             "influence_b": float(c.b.matrix.loc[tr, te])}
            for te in c.test for tr in c.train]
    return pd.DataFrame(rows, columns=["train_set", "test_set", "influence_a", "influence_b"])


def _side(record: RunRecord, v: MatrixView) -> dict:
    return {"run_id": record.run_id, "run_name": record.run_name, "job": record.job,
            "model": record.model, "method": v.method, "point": v.point}


def compare_json(c: Comparison, record_a: RunRecord, record_b: RunRecord) -> dict:
    """`compare` for scripts."""
    return {
        "a": _side(record_a, c.a), "b": _side(record_b, c.b),
        "train_sets": c.train, "test_sets": c.test, "dropped": c.dropped,
        "pearson": c.pearson, "spearman": c.spearman,
        "top1_agreement": c.top1_agreement, "per_test": _records(c.per_test),
        "scores_a": c.scores_a, "scores_b": c.scores_b,
        "cells": _records(compare_frame(c)),
    }

# --- writing for scripts -----------------------------------------------------------------------


def write_output(fmt: str, frame: pd.DataFrame | None, data: Any,
                 output: Path | None, write_stdout) -> None:
    """csv and parquet write `frame`, json writes `data` (to `output`, or stdout for csv and
    json); parquet needs a file."""
    if fmt == "parquet":
        if output is None:
            raise BrowseError("--format parquet writes a binary file: give --output FILE")
        frame.to_parquet(output, index=False)
        return
    text = frame.to_csv(index=False) if fmt == "csv" else to_json(data) + "\n"
    if output is None:
        write_stdout(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
