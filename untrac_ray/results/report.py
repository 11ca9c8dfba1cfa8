"""One self-contained HTML page of a run (`untrac-ray report`), to look at without the MLflow UI
or send to a colleague: the verdict on how far to trust it, the scores against the ground truth
at the point fixed in advance, how well the methods agree, each method's matrix (the numbers
as `show` prints them, training sets by mean influence, and its heatmap), the trajectories, the
scatters against the ground truth, the drill-down's top rows and the job's settings. The
figures are embedded (base64 PNG): the page needs nothing beside it.

Plain HTML and CSS from the standard library; every number is also in a `data-` attribute, so
that a script (or a test) reads the page back exactly.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from untrac_ray.results.browse import (
    MatrixView,
    fmt_duration,
    fmt_time,
    methods_of,
    view,
)
from untrac_ray.results.score_views import headline_rows, summary_table
from untrac_ray.results.scoring import agreement_of, cells_at
from untrac_ray.results.tables import method_title
from untrac_ray.results.verdict import Line

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warn { color: #a15c00; } .figure { max-width: 100%; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.meta { color: #555; }
"""


@dataclass
class RunReport:
    """What the page shows, read out of a run (cli/browse.py reads it)."""

    run_id: str
    title: str
    meta: list[str]
    table: pd.DataFrame  # the tidy influence table
    trust: list[Line]
    scores: pd.DataFrame | None = None  # the one score table (results/scores.py)
    examples: pd.DataFrame | None = None  # the drill-down (UnTrac-Inv's top rows)
    job_yaml: str | None = None
    figures: dict[str, bytes] = field(default_factory=dict)  # figures/<name>.png -> PNG


def _cell(value) -> str:
    """A table cell: numbers signed to 4 places, with their exact value in data-value."""
    if isinstance(value, (float, np.floating)):
        shown = "-" if value != value else f"{value:+.4f}"
        return f'<td data-value="{float(value)!r}">{shown}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _image(name: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return (f'<img class="figure" alt="{html.escape(name)}" data-name="{html.escape(name)}" '
            f'src="data:image/png;base64,{encoded}">')


def _matrix(v: MatrixView) -> str:
    rows = [[str(name), *[float(x) for x in row]] for name, row in v.matrix.iterrows()]
    where = f" at {v.where()}" if v.point else ""
    return (f'<h3>{html.escape(method_title(v.method))}{html.escape(where)}</h3>'
            f'<div data-method="{html.escape(v.method)}" data-point="{v.point}">'
            + _table(["train \\ test", *map(str, v.matrix.columns)], rows, "matrix")
            + "</div>")


def _cells(row: list) -> list:
    """A score_views row for _table: correlations as floats, blanks as '-'."""
    return [c if isinstance(c, float) else ("-" if c is None else str(c)) for c in row]


def _scores(scores: pd.DataFrame) -> list[str]:
    """The scores section: the one score table's headline view (score_views.summary_table),
    its notes and warnings, as `run` and `show` print them."""
    st = summary_table(scores)
    if st is None:
        return []
    parts = ["<h2>Scores against the ground truth</h2>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in st.notes]
    parts.append(_table(st.headers, [_cells(row) for row in st.rows], "scores"))
    parts += [f'<p class="warn">{html.escape(w)}</p>' for w in st.warnings]
    return parts


def method_agreement(table: pd.DataFrame, scores: pd.DataFrame | None) -> list[list]:
    """Every pair of estimates in the run: the Pearson of their cells, each at its headline
    point (the score table's), else its last."""
    top = headline_rows(scores)
    points = {r.method: int(r.point) for r in top.itertuples()} if not top.empty else {}
    estimates = [m for m in methods_of(table) if m != "ldo"]
    cells = {m: cells_at(table, m, points.get(m)) for m in estimates}
    return [[f"{method_title(a)} / {method_title(b)}", agreement_of([cells[a], cells[b]])]
            for i, a in enumerate(estimates) for b in estimates[i + 1:]]


def report_html(r: RunReport) -> str:
    """The whole page."""
    parts = [f"<h1>{html.escape(r.title)}</h1>"]
    parts += [f'<p class="meta">{html.escape(line)}</p>' for line in r.meta]
    parts.append("<h2>How far to trust it</h2><ul>")
    for line in r.trust:
        parts.append(f'<li class="{"warn" if line.warning else ""}">{html.escape(line)}</li>')
    parts.append("</ul>")
    if r.scores is not None and not r.scores.empty:
        parts += _scores(r.scores)
    pairs = method_agreement(r.table, r.scores)
    if pairs:
        parts.append("<h2>Agreement between the methods</h2><p>Pearson over all cells: "
                     "estimates of the same influences that disagree make each other "
                     "uncertain.</p>" + _table(["methods", "pearson"], pairs, "agreement"))
    parts.append("<h2>Influence</h2><p>Loss after minus loss before: positive means the "
                 "training set helped the model fit the test set; training sets from the "
                 "largest mean influence down.</p>")
    for method in methods_of(r.table):
        parts.append(_matrix(view(r.table, method)))
        heat = r.figures.get(f"figures/heatmap_{method}.png")
        if heat is not None:
            parts.append(_image(f"heatmap_{method}", heat))
    for kind, heading in (("trajectory", "Along unlearning"),
                          ("scatter", "Against leave-dataset-out")):
        shown = sorted(n for n in r.figures if n.startswith(f"figures/{kind}_"))
        if shown:
            parts.append(f"<h2>{heading}</h2>")
            parts += [_image(n.removeprefix("figures/").removesuffix(".png"), r.figures[n])
                      for n in shown]
    if r.examples is not None and not r.examples.empty:
        top = (r.examples.sort_values(["test_set", "train_set", "rank"])
               .groupby(["test_set", "train_set"], sort=False).head(3))
        parts.append("<h2>Drill-down: training rows whose loss rose most</h2><p>When the "
                     "test set was unlearned (UnTrac-Inv), the top rows of each training "
                     "set.</p>" + _table(["test set", "training set", "#", "loss change",
                                          "text"],
                                         [[t.test_set, t.train_set, str(t.rank),
                                           float(t.loss_change), str(t.text)[:300]]
                                          for t in top.itertuples()], "examples"))
    if r.job_yaml:
        parts.append(f"<h2>The job</h2><pre>{html.escape(r.job_yaml)}</pre>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(r.title)}</title><style>{STYLE}</style></head>"
            f'<body data-run="{html.escape(r.run_id)}">\n{body}\n</body></html>\n')


def run_meta(record) -> list[str]:
    """The page's header lines from a run record (runs.RunRecord)."""
    duration = ((record.end_ms or 0) - (record.start_ms or 0)) / 1000 if record.end_ms else None
    return [f"run {record.run_id} ({record.experiment}), job {record.job}, model "
            f"{record.model}",
            f"{record.n_train} training sets x {record.n_test} test sets, methods "
            f"{', '.join(record.methods)}",
            f"status {record.status}, started {fmt_time(record.start_ms)}, took "
            f"{fmt_duration(duration)}"]
