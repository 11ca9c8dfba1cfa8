"""Drawing results in a terminal (rich): the runs table, a run's header, matrices coloured by
sign, top training sets, scores, drill-down examples, two matrices side by side, and the trust
signal. What is drawn is computed in results/browse.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from rich.console import Group
from rich.table import Table
from rich.text import Text

from untrac_ray.inputs.spec_sections import GROUND_TRUTH
from untrac_ray.results.score_views import (
    ROW_NAMES,
    ScoreTable,
    best_point,
    fmt,
    per_test_table,
    scores_in,
    summary_table,
)
from untrac_ray.results.scores import ESTIMATE, SCORES

if TYPE_CHECKING:
    from untrac_ray.results.runs import RunRecord
    from untrac_ray.results.verdict import Line

from untrac_ray.results.browse import (
    Comparison,
    MatrixView,
    best_of,
    duration_s,
    examples_for,
    fmt_corr,
    fmt_duration,
    fmt_time,
    shown_status,
    top_k,
)


def basic_colours(console) -> bool:
    """True on terminals of 8 or 16 colours, where shaded backgrounds would turn yellow."""
    return console.color_system in ("standard", "windows")


def cell_style(value: float, bound: float, basic: bool = False) -> str:
    """A diverging background for a cell: red for positive, blue for negative, white at zero.

    `basic` (terminals of 8/16 colours): red or blue text, on red or blue when strong.
    """
    if value != value or bound <= 0:
        return ""
    t = max(-1.0, min(1.0, value / bound))
    if basic:
        colour = "red" if t > 0 else "blue"
        return (f"bold white on {colour}" if abs(t) > 0.5
                else colour if abs(t) > 0.15 else "")
    end = (178, 24, 43) if t > 0 else (33, 102, 172)
    rgb = [round(255 + (c - 255) * abs(t)) for c in end]
    fg = "white" if abs(t) > 0.55 else "black"
    return f"{fg} on #{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}"

STATUS_STYLE = {"FINISHED": "green", "RUNNING": "yellow", "FAILED": "red", "KILLED": "red",
                "STALE": "magenta"}


# The runs table's optional columns, dropped in this order when the console is narrow (the
# run id, job, status, correlation and duration always stay, each at its full width).
DROP_ORDER = ("model", "methods", "start", "train x test", "experiment", "parent")


def runs_table(records: list[RunRecord], title: str, width: int | None = None) -> Table:
    """The runs as a rich table, newest first; a parent column when some runs are nested.

    With `width` (a terminal's columns), optional columns are dropped by priority
    (DROP_ORDER) until the rest fit at full width, and run ids shortened to 8 characters
    when even that is too wide; without it (output piped or to a file) every value is whole.
    """
    nested = any(r.parent_id for r in records)
    experiments = {r.experiment for r in records}
    rows = []
    for r in records:
        best_method, best = best_of(r)
        rows.append({
            "run id": r.run_id,
            "parent": ("└ " + r.parent_id[:8]) if r.parent_id else "",
            "experiment": r.experiment,
            "job": r.job, "methods": ", ".join(r.methods), "model": r.model,
            "train x test": f"{r.n_train if r.n_train is not None else '?'} x "
                            f"{r.n_test if r.n_test is not None else '?'}",
            "status": shown_status(r),
            "r vs truth (top method)": "-" if best is None else f"{best_method} {best:+.3f}",
            "start": fmt_time(r.start_ms), "duration": fmt_duration(duration_s(r)),
        })
    columns = ["run id", *(["parent"] if nested else []),
               *(["experiment"] if len(experiments) > 1 else []), "job", "methods", "model",
               "train x test", "status", "r vs truth (top method)", "start", "duration"]

    def needed(cols: list[str]) -> int:  # each column's widest value, plus borders and padding
        return 1 + sum(3 + max(len(c), *(len(row[c]) for row in rows)) for c in cols)

    if width is not None:
        for name in DROP_ORDER:
            if needed(columns) <= width:
                break
            if name in columns:
                columns.remove(name)
        if needed(columns) > width:
            for row in rows:
                row["run id"] = row["run id"][:8]
    table = Table(title=title, title_justify="left")
    right = {"train x test", "r vs truth (top method)", "duration"}
    for name in columns:
        table.add_column(name, no_wrap=True, justify="right" if name in right else "left",
                         style="cyan" if name == "run id" else None)
    for row in rows:
        cells = [row[c] for c in columns]
        if "status" in columns:
            i = columns.index("status")
            cells[i] = Text(row["status"], style=STATUS_STYLE.get(row["status"], ""))
        table.add_row(*cells)
    return table


def heading(text: str) -> Text:
    """A section heading (printed above a table: table titles wrap to the table's width)."""
    return Text(text, style="bold")


def matrix_table(v: MatrixView, title: str | None = None, basic: bool = False) -> Table:
    """The matrix as a coloured table (red: positive, blue: negative) with a mean column;
    `basic` for terminals of 8/16 colours."""
    mat = v.matrix
    values = mat.to_numpy(dtype=float)
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
    table = Table(title=title, title_justify="left")
    table.add_column("train \\ test")
    for t in mat.columns:
        table.add_column(str(t), justify="right")
    table.add_column("mean", justify="right", style="bold")
    for name, row in mat.iterrows():
        cells = [Text("     -" if x != x else f"{x:+.4f}", style=cell_style(x, bound, basic))
                 for x in row.to_numpy(dtype=float)]
        table.add_row(str(name), *cells, f"{np.nanmean(row.to_numpy(dtype=float)):+.4f}")
    return table


def top_table(v: MatrixView, k: int) -> Table:
    """The k most influential training sets of each test set."""
    top = top_k(v, k)
    table = Table()
    table.add_column("test set")
    for rank in range(1, min(k, len(v.matrix.index)) + 1):
        table.add_column(f"#{rank}")
    for test_set, part in top.groupby("test_set", sort=False):
        table.add_row(str(test_set), *[f"{r.train_set} ({r.influence:+.3g})"
                                       for r in part.itertuples()])
    return table


def score_renderables(st: ScoreTable | None, title: str = "") -> list:
    """A table of results/score_views.py (the one score table's views), its notes dim and its
    warnings yellow; rows that are not estimates (references, the ceiling) dim."""
    if st is None:
        return []
    table = Table(title=title or None)
    for i, col in enumerate(st.headers):
        table.add_column(col, justify="left" if i == 0 else "right")
    for i, row in enumerate(st.rows):
        kind = st.kinds[i] if st.kinds else ESTIMATE
        style = ("bold" if row[0] in ROW_NAMES.values() else
                 "" if kind == ESTIMATE else "dim")
        table.add_row(*[Text(fmt(c), style=style) for c in row])
    out: list = [table]
    out += [Text(note, style="dim") for note in st.notes]
    out += [Text(f"warning: {w}", style="yellow") for w in st.warnings]
    return out


def examples_table(shown: pd.DataFrame, width: int = 70) -> Table:
    table = Table()
    for col in ("test set", "training set", "#", "loss change", "text"):
        table.add_column(col, justify="right" if col in ("#", "loss change") else "left")
    for r in shown.itertuples():
        text = " ⏎ ".join(str(r.text).splitlines())
        if len(text) > width:
            text = text[: width - 1] + "…"
        table.add_row(str(r.test_set), str(r.train_set), str(r.rank), f"{r.loss_change:+.4f}",
                      Text(text))
    return table

def trust_renderables(lines: list[Line]) -> list:
    """The verdict (results/verdict.py) under its heading; its warnings in yellow."""
    out: list = [Text(""), heading("how far to trust it")]
    out += [Text(line, style="yellow" if line.warning else "") for line in lines]
    return out


def header(record: RunRecord, figures: list[str] | None = None) -> Group:
    """Who, what and when of a run, a few lines; `figures`: their folder, then their names."""
    best_method, best = best_of(record)
    lines = [
        Text.assemble(("run ", "bold"), (record.run_name or record.run_id, "bold cyan"),
                      f"  {record.run_id}  ({record.experiment})"),
        Text(f"job {record.job or '-'}  model {record.model or '-'}  "
             f"{record.n_train if record.n_train is not None else '?'} training sets x "
             f"{record.n_test if record.n_test is not None else '?'} test sets  "
             f"methods {', '.join(record.methods) or '-'}"),
        Text.assemble("status ", (shown_status(record),
                                  STATUS_STYLE.get(shown_status(record), "")),
                      f"  started {fmt_time(record.start_ms)}  "
                      f"duration {fmt_duration(duration_s(record))}"
                      + (f"  r vs truth (top method) {best_method} {best:+.3f}"
                         if best is not None else "")),
    ]
    if record.parent_id:
        lines.append(Text(f"parent run {record.parent_id}"))
    if record.error:
        lines.append(Text(f"error: {record.error}", style="red"))
    if figures:
        lines.append(Text(f"figures in {figures[0]}: " + ", ".join(figures[1:]), style="dim"))
    return Group(*lines)


def show_renderables(record: RunRecord, views: list[MatrixView], k: int,
                     scores: pd.DataFrame | None, examples: pd.DataFrame | None,
                     want_examples: bool, n_examples: int, figures: list[str] | None = None,
                     partial: bool = False, basic: bool = False,
                     trust: list[Line] | None = None) -> list:
    """Everything `show` prints, in order, the verdict last (`trust`)."""
    out: list = [header(record, figures)]
    if partial:
        out.append(Text("the run did not finish: showing the cells it logged "
                        "(influence_partial)", style="yellow"))
    for v in views:
        out.append(Text(""))
        at = f" at {v.where()}" if v.point else ""
        out.append(heading(f"{v.method}: influence{at}, training sets by mean influence"))
        out.append(matrix_table(v, basic=basic))
        out.append(heading(f"{v.method}: top {k} training sets per test set"))
        out.append(top_table(v, k))
        part = per_test_table(scores, v.method, v.point)
        if v.method == GROUND_TRUTH:
            out.append(Text("ldo (leave-dataset-out retraining) is the ground truth",
                            style="dim"))
        elif part is not None:
            against = " and ".join(dict.fromkeys(
                SCORES[s].truth for s in scores_in(scores[scores["method"] == v.method])))
            out.append(heading(f"{v.method}{at} vs the ground truth ({against})"))
            out += score_renderables(part)
            best = best_point(scores, v.method, scores_in(scores)[0])
            if best is not None and v.point:
                out.append(Text(f"best point in hindsight: {best[0]} ({best[1]:+.3f})",
                                style="dim"))
        elif scores is None:
            out.append(Text("no scores against a ground truth in this run (add methods.ldo, "
                            "methods.lds or ground_truth to the job)", style="dim"))
    if scores is not None:
        out.append(Text(""))
        out += score_renderables(summary_table(scores), "scores against the ground truth, at "
                                 "the point fixed in advance")
    out.append(Text("influence = loss after - loss before: positive means the training set "
                    "helped the model fit the test set", style="dim"))
    if want_examples:
        if examples is None or examples.empty:
            out.append(Text("this run has no drill-down examples (UnTrac-Inv with "
                            "evaluation.top_examples > 0 logs them)", style="yellow"))
        else:
            out.append(heading("top training examples (drill-down: how much each training "
                               "row's loss rose when the test set was unlearned)"))
            out.append(examples_table(examples_for(examples, views, k, n_examples)))
    if trust:
        out += trust_renderables(trust)
    return out


def compare_renderables(c: Comparison, basic: bool = False) -> list:
    """Both matrices side by side on the shared cells, then their agreement."""
    from rich.columns import Columns

    a = MatrixView(c.a.method, c.a.point, c.a.points, c.a.steps,
                   c.a.matrix.loc[c.train, c.test])
    b = MatrixView(c.b.method, c.b.point, c.b.points, c.b.steps,
                   c.b.matrix.loc[c.train, c.test])
    out: list = [Columns([matrix_table(a, f"A: {c.label_a}", basic),
                          matrix_table(b, f"B: {c.label_b}", basic)], padding=(0, 4))]
    if c.dropped:
        out.append(Text(f"not in both, left out: {', '.join(c.dropped)}", style="yellow"))
    out.append(heading("agreement of A and B"))
    table = Table()
    for col in ("test set", "pearson", "spearman", "top in A", "top in B"):
        table.add_column(col, justify="right" if col in ("pearson", "spearman") else "left")
    for r in c.per_test.itertuples():
        same = r.top_a is not None and r.top_a == r.top_b
        table.add_row(str(r.test_set), fmt_corr(r.pearson), fmt_corr(r.spearman),
                      str(r.top_a), Text(str(r.top_b), style="green" if same else "red"))
    table.add_row(Text("all cells", style="bold"), fmt_corr(c.pearson), fmt_corr(c.spearman),
                  "", "")
    out.append(table)
    out.append(Text(f"Pearson r over {len(c.train) * len(c.test)} shared cells: "
                    f"{fmt_corr(c.pearson)}; Spearman {fmt_corr(c.spearman)}; same top training "
                    f"set for {c.top1_agreement} of {len(c.test)} test sets"))
    for side, scores in (("A", c.scores_a), ("B", c.scores_b)):
        if scores:
            out.append(Text(f"{side} against its run's ground truth: {scores}"))
    return out
