"""`untrac-ray tune`: the job's hyperparameter search on Ray Tune, with a live table of trials.

Thin: parses options, calls search/driver.run_search, prints. main.py calls `register(app)`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from untrac_ray.cli.common import INTERRUPTED, Settings, err_console, fail, out_console
from untrac_ray.cli.progress import CliReporter
from untrac_ray.inputs.errors import InputError, UntracError

STATUS_STYLE = {"pending": "dim", "running": "cyan", "completed": "green",
                "stopped early": "yellow", "failed": "red"}


def _value(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _live_trials(quiet: bool):
    """The CLI's SearchReporter (defined here so that `untrac-ray --help` stays light)."""
    from untrac_ray.search.reporting import SearchReporter, TrialView

    class _LiveTrials(SearchReporter):
        """Stages and training progress first (as `run` shows them), then a live table of trials
        on stderr, redrawn as trials start, report an evaluation point, and end."""

        def __init__(self, quiet: bool) -> None:
            self.quiet = quiet
            self.before = CliReporter(quiet)
            self.live: Live | None = None
            self.views: dict[str, TrialView] = {}
            self.settings: list[str] = []
            self.total = 0
            self.mode = "max"
            self.title = ""

        def __enter__(self) -> _LiveTrials:
            self.before.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            if self.live is not None:
                self.live.update(self.render(), refresh=True)
                self.live.stop()
                if not self.live.console.is_terminal:
                    self.live.console.line()
            else:
                self.before.__exit__(*exc)

        def stage(self, message: str) -> None:
            if self.live is not None:
                if not self.quiet:
                    self.live.console.print(f"[cyan]>[/] {message}", highlight=False)
            else:
                self.before.stage(message)

        def training_step(self, step: int, total: int, loss: float, tokens: int = 0) -> None:
            self.before.training_step(step, total, loss, tokens)

        def data_progress(self, name: str, rows_done: int, rows_total: int | None,
                          tokens: int, finished: bool = False) -> None:
            self.before.data_progress(name, rows_done, rows_total, tokens, finished)

        def search_started(self, name: str, trials: int, settings: list[str], resumed: bool
                           ) -> None:
            self.before.__exit__(None, None, None)
            self.settings, self.total = settings, trials
            self.title = f"{'resumed ' if resumed else ''}search {name}: {trials} trials"
            self.stage(f"{self.title} on Ray Tune")
            if not self.quiet and not self.before.lines:
                # Piped (not a terminal): one final table, as wide as it needs.
                console = err_console if err_console.is_terminal else Console(
                    stderr=True, width=24 + 16 * len(settings) + 48)
                self.live = Live(self.render(), console=console, refresh_per_second=4,
                                 transient=False)
                self.live.start()

        def trial_update(self, view: TrialView) -> None:
            before = self.views.get(view.trial_id)
            # a copy: the search updates one view in place, and a line is for what changed
            self.views[view.trial_id] = dataclasses.replace(view)
            if self.live is not None:
                self.live.update(self.render())
            elif self.before.lines and not self.quiet and (
                    before is None or (before.status, before.round) != (view.status, view.round)):
                self.before.say(self.line(view))

        def line(self, view: TrialView) -> str:
            """A trial's news as one line (for logs): its settings, point and objective."""
            settings = ", ".join(f"{k}={_value(view.config.get(k, ''))}" for k in self.settings)
            point = f", point {view.round}/{view.rounds}" if view.rounds else ""
            objective = ("" if math.isnan(view.objective)
                         else f", objective {_value(view.objective)}")
            ended = sum(v.status in ("completed", "stopped early", "failed")
                        for v in self.views.values())
            error = f": {view.error}" if view.error else ""
            return (f"trial {view.index} ({settings}): {view.status}{point}{objective}"
                    f"{error} [{ended}/{self.total} ended]")

        def render(self) -> Group:
            table = Table(title=self.title or "trials", title_justify="left")
            table.add_column("trial", justify="right", no_wrap=True)
            table.add_column("status", no_wrap=True)
            for key in self.settings:
                table.add_column(key, justify="right", no_wrap=True)
            for col in ("point", "objective", "MLflow run"):
                table.add_column(col, justify="right" if col != "MLflow run" else "left",
                                 no_wrap=True)
            finite = [v for v in self.views.values() if not math.isnan(v.objective)
                      and v.status in ("completed", "stopped early")]
            pick = max if self.mode == "max" else min
            best = pick(finite, key=lambda v: v.objective).trial_id if finite else None
            for v in sorted(self.views.values(), key=lambda v: v.index):
                status = Text(v.status, style=STATUS_STYLE.get(v.status, ""))
                objective = _value(v.objective) + (" *" if v.trial_id == best else "")
                table.add_row(str(v.index), status, *[_value(v.config.get(k, "")) for k in
                                                      self.settings],
                              f"{v.round}/{v.rounds}" if v.rounds else "-",
                              objective, v.run_id[:8])
            ended = sum(v.status in ("completed", "stopped early", "failed")
                        for v in self.views.values())
            note = Text(f"{ended}/{self.total} trials ended; * best so far", style="dim")
            return Group(table, note)

    return _LiveTrials(quiet)


def _print_best(outcome, label: str) -> None:
    best = outcome.best
    counts = outcome.trials["status"].value_counts()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    out_console.print(f"search {outcome.name}: {len(outcome.trials)} of {outcome.total} "
                      f"trials ({summary})", highlight=False)
    if best is None:
        out_console.print("no trial ended with a finite objective", highlight=False)
    else:
        out_console.print(f"best trial {best['trial_id']} ({best['status']}): objective "
                          f"{best['objective']:.4f}", highlight=False)
        table = Table()
        table.add_column("setting")
        table.add_column("value", justify="right")
        for key, value in best["config"].items():
            table.add_row(key, _value(value))
        out_console.print(table)
        out_console.print(f"objective: {label}", highlight=False)
        if outcome.best_job_path:
            out_console.print(f"best configuration as a job file: {outcome.best_job_path} "
                              "(MLflow artifact best_job.yaml)", highlight=False, soft_wrap=True)
    out_console.print(f"MLflow run {outcome.parent_run_id} in {outcome.tracking_uri} "
                      f"(one nested run per trial)", highlight=False, soft_wrap=True)


def tune(
    job: Annotated[Path, typer.Argument(help="the job spec (YAML) with a `search:` section",
                                        show_default=False)],
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI,"
                     " then the spec's tracking.uri, then sqlite:///mlflow.db)"),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster address (default: the spec's, else local "
                     "Ray)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="finish this job's interrupted search (only the "
                           "trials that had not ended run)"),
    ] = False,
    storage_path: Annotated[
        str | None,
        typer.Option("--storage-path", help="Ray Tune's storage: a folder the nodes share or a "
                     "URI (default: search.storage_path, else <cache_dir>/tune)",
                     show_default=False),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live table")] = False,
    settings: Settings = None,
) -> None:
    """Search the unlearning settings on Ray Tune (the job's `search:`).

    Every trial is a nested MLflow run; the best settings are written as a job file."""
    import os

    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.search.driver import SearchInterrupted, objective_label, run_search
    from untrac_ray.submit.staging import submission_tags

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading back

    try:
        spec = load_spec(job, settings or ())
        if spec.search is None:
            raise InputError(f"{job}: no `search:` section; add one (docs/searches.md) "
                             "or use `untrac-ray run`")
        if storage_path:
            spec.search.storage_path = storage_path if "://" in storage_path else str(
                Path(storage_path).resolve())
        with _live_trials(quiet) as reporter:
            reporter.mode = spec.search.objective.mode
            outcome = run_search(spec, tracking_uri, address, reporter, resume=resume,
                                 tags=submission_tags())
    except SearchInterrupted as err:
        _print_best(err.outcome, objective_label(spec))
        err_console.print(f"[yellow]interrupted:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=INTERRUPTED) from None
    except UntracError as err:
        raise fail(err) from None
    _print_best(outcome, objective_label(spec))


def register(app: typer.Typer, panel: str) -> None:
    """Add `tune` to the main app, in its `panel`."""
    app.command(name="tune", rich_help_panel=panel)(tune)
