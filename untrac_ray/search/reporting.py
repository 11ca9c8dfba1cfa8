"""The driver's side of a search's trials: a Tune callback hands every trial's start, reports
and end to a `TrialLogger`, which keeps its nested MLflow run (tracking.SearchRun) and its line
in the CLI's live table (`SearchReporter`, `TrialView`).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from untrac_ray.inputs.spec import (
    JobSpec,
)
from untrac_ray.results.scores import score_frame
from untrac_ray.results.tables import influence_table
from untrac_ray.run.job_setup import Reporter
from untrac_ray.search.space import CELL_FIELDS, OBJECTIVE, flat_config, scored_methods

# ------------------------------------------------------------------ the driver's view


@dataclass
class TrialView:
    """What the CLI shows of one trial."""

    trial_id: str
    index: int
    config: dict[str, Any]
    status: str = "pending"  # running, completed, stopped early, failed
    round: int = 0
    rounds: int = 0
    objective: float = float("nan")
    run_id: str = ""
    error: str = ""


class SearchReporter(Reporter):
    """What a search tells its caller as it goes; the CLI draws a live table from it."""

    def search_started(self, name: str, trials: int, settings: list[str], resumed: bool
                       ) -> None:
        """The Tuner starts (or resumes) `trials` trials over `settings`."""

    def trial_update(self, view: TrialView) -> None:
        """A trial started, reported a round, or ended."""


def _param_value(text: str) -> Any:
    """A logged param back as a number where it is one."""
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def _cells_from(report: dict[str, Any]) -> list[dict]:
    raw = report.get("cells")
    if not isinstance(raw, str) or not raw:
        return []
    return [dict(zip(CELL_FIELDS, c, strict=True)) for c in json.loads(raw)]


def error_line(text: str) -> str:
    """The one-line message of an error raised in a trial (from Tune's traceback text)."""
    found = re.findall(r"(?:\w+\.)*(\w+(?:Error|Exception)): (.+)", text)
    return found[-1][1].strip() if found else (text.strip().splitlines() or [""])[-1]


def trial_status(report: dict[str, Any] | None) -> str:
    if not report:
        return "failed"
    return "completed" if report.get("round", 0) >= report.get("rounds", 1) else "stopped early"


def result_status(metrics: dict[str, Any], error: str | None) -> str:
    """A trial's status from Tune's last result of it: failed, completed, stopped early, or
    pending (interrupted before it ended: `--resume` runs it again). A trial that reported its
    last round is complete even without Tune's `done` flag: a driver killed within a second
    of the trial's end can leave that flag out of Tune's saved state, and the trial would
    otherwise stay pending through every resume."""
    if error:
        return "failed"
    if metrics.get("done") or (metrics and trial_status(metrics) == "completed"):
        return trial_status(metrics)
    return "pending"


class TrialLogger:
    """The driver's side of every trial: its MLflow child run and its line in the CLI."""

    def __init__(self, run, spec: JobSpec, reporter: SearchReporter, train: list[str],
                 test: list[str], truth: pd.DataFrame | None, name: str) -> None:
        self.run = run
        self.spec = spec
        self.reporter = reporter
        self.train, self.test, self.truth = train, test, truth
        self.name = name
        records = run.child_records()  # trials logged before a resume
        self.children = {t: (r["run_id"], r["status"]) for t, r in records.items()}
        self.views: dict[str, TrialView] = {}
        self.reports: dict[str, list[dict]] = {}
        self.handles: dict[str, Any] = {}
        self.earlier = [self._earlier_view(t, r) for t, r in records.items()
                        if r["status"] in ("FINISHED", "FAILED")]

    def _earlier_view(self, trial_id: str, record: dict[str, Any]) -> TrialView:
        """How a trial that ended before a resume looked (for the live table)."""
        index = int(trial_id.rsplit("_", 1)[-1]) if "_" in trial_id else 0
        tags, metrics = record["tags"], record["metrics"]
        config = {k: _param_value(v) for k, v in record["params"].items()}
        return TrialView(trial_id, index, config, tags.get("untrac_ray.trial_status", "ended"),
                         int(metrics.get("rounds_run", 0)), int(metrics.get("rounds_run", 0)),
                         float(metrics.get(OBJECTIVE, float("nan"))), record["run_id"],
                         tags.get("untrac_ray.error", ""))

    def view(self, trial_id: str, config: dict[str, Any]) -> TrialView:
        if trial_id not in self.views:
            index = int(trial_id.rsplit("_", 1)[-1]) if "_" in trial_id else len(self.views)
            self.views[trial_id] = TrialView(trial_id, index, flat_config(config))
        return self.views[trial_id]

    def started(self, trial_id: str, config: dict[str, Any]) -> None:
        old = self.children.pop(trial_id, None)
        if old is not None:  # cut off by a killed driver: redone from the start
            self.run.delete_child(old[0])
        view = self.view(trial_id, config)
        handle = self.run.child(trial_id, f"{self.name}-{view.index:03d}", flat_config(config),
                                tags={"search": self.name,
                                      "methods": ",".join(scored_methods(self.spec))})
        self.handles[trial_id] = handle
        self.reports[trial_id] = []
        view.status, view.run_id, view.round = "running", handle.run_id, 0
        self.reporter.trial_update(view)

    def result(self, trial_id: str, config: dict[str, Any], report: dict[str, Any]) -> None:
        if trial_id not in self.handles:
            self.started(trial_id, config)
        self.reports[trial_id].append(report)
        self._log_round(self.handles[trial_id], report)
        view = self.view(trial_id, config)
        view.round, view.rounds = int(report["round"]), int(report["rounds"])
        view.objective = float(report[OBJECTIVE])
        self.reporter.trial_update(view)

    def _log_round(self, handle, report: dict[str, Any]) -> None:
        point = int(report["round"])  # round r evaluates point r of every method that has it
        values = {k: float(v) for k, v in report.items()
                  if k == OBJECTIVE or k == "objective_now" or (
                      k.startswith("objective_") and isinstance(v, int | float))}
        values["round"] = float(report["round"])
        handle.log_metrics(values, step=point)
        handle.log_cells(_cells_from(report))

    def completed(self, trial_id: str, config: dict[str, Any],
                  error: str | None = None) -> None:
        if trial_id not in self.handles:
            self.started(trial_id, config)
        handle, reports = self.handles.pop(trial_id), self.reports.pop(trial_id, [])
        view = self.view(trial_id, config)
        status = "failed" if error else trial_status(reports[-1] if reports else None)
        rows = [c for r in reports for c in _cells_from(r)]
        try:
            if rows:
                self._log_tables(handle, rows)
            if reports:
                last = reports[-1]
                handle.log_metrics({"rounds_run": float(last["round"]),
                                    "compute_seconds": sum(float(r.get("compute_seconds", 0))
                                                           for r in reports)})
        finally:
            self.run.end_child(handle, "FAILED" if error else "FINISHED", error,
                               tags={"trial_status": status})
        view.status, view.error = status, error or ""
        self.reporter.trial_update(view)

    def _log_tables(self, handle, rows: list[dict]) -> None:
        from untrac_ray.results import plots

        table = influence_table(rows, self.train, self.test)
        handle.log_table(table, "influence")
        for method in dict.fromkeys(table["method"]):
            handle.log_figure(plots.heatmap(table, method, self.train, self.test),
                              f"figures/heatmap_{method}.png")
        if self.truth is not None:
            handle.log_score_table(score_frame(table, self.train, self.test,
                                               groups=self.spec.data.test_groups(),
                                               truth=self.truth))

    def replay(self, trial_id: str, config: dict[str, Any], reports: list[dict],
               error: str | None) -> None:
        """Log a trial that Tune finished but whose run was not closed (a killed driver)."""
        old = self.children.pop(trial_id, None)
        if old is not None:
            self.run.delete_child(old[0])
        self.started(trial_id, config)
        for report in reports:
            self.result(trial_id, config, report)
        self.completed(trial_id, config, error)


LOGGERS: dict[str, TrialLogger] = {}  # by search name, in the driver process


class SearchCallback(Callback):
    """A Tune callback that hands the driver's trial events to the search's logger.

    Tune pickles its callbacks with the experiment; this one holds only the search's name and
    finds the live logger (MLflow client, CLI) in the driver that runs or resumes the search.
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        LOGGERS[self.key].started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        LOGGERS[self.key].result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        LOGGERS[self.key].completed(trial.trial_id, trial.config)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        LOGGERS[self.key].completed(trial.trial_id, trial.config, _trial_error(trial))


def _trial_error(trial) -> str:
    """A failed trial's one-line error (its error file is written locally before storage)."""
    text = None
    with contextlib.suppress(Exception):
        local = trial.error_file
        if local and Path(local).is_file():
            text = Path(local).read_text(encoding="utf-8", errors="replace")
    if not text:
        with contextlib.suppress(Exception):
            text = trial.get_error()
    return error_line(str(text)) if text else "trial failed (see Tune's error file)"


