"""The `untrac-ray` command line: it parses, calls the runner, and prints. Nothing more.

Commands are grouped in --help as Run, Results and Cluster; common.py holds the options and
the exit codes they share.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from untrac_ray.cli.common import (
    INTERRUPTED,
    Address,
    JobFile,
    Quiet,
    Settings,
    TrackingUri,
    err_console,
    escape_unprintable,
    fail,
    out_console,
)
from untrac_ray.cli.progress import CliReporter
from untrac_ray.inputs.errors import UntracError

RUN, RESULTS, CLUSTER = "Run", "Results", "Cluster"  # the groups of --help
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Which training datasets made a language model say what it says (UnTrac on Ray). "
         "Exit codes: 0 done, 1 the job failed while it ran, 2 bad input or usage, "
         "130 interrupted, 143 terminated.",
)


def _version(value: bool) -> None:
    if value:
        from untrac_ray import __version__

        sys.stdout.write(f"untrac-ray {__version__}\n")
        raise typer.Exit()


@app.callback()
def _quiet_libraries(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Keep library chatter (download bars, store migrations) off the terminal, and every
    credential out of what is printed (inputs/redaction.py: before anything else runs); on a
    terminal that cannot print every character, escape those it cannot."""
    import logging
    import os

    from untrac_ray.inputs.redaction import install_output_redaction

    escape_unprintable()
    install_output_redaction()

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Not HF_HUB_OFFLINE: local folders load with local_files_only; only a Hub id in
    # model.path asks the Hub (inputs/hub.py), and the user's HF_HUB_OFFLINE=1 forbids that.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _print_matrices(outcome) -> None:
    """Each method's matrix at its last point, as `show` draws it (rows by mean influence)."""
    from untrac_ray.cli.render import basic_colours, heading, matrix_table
    from untrac_ray.results.browse import methods_of, view

    for method in methods_of(outcome.table):
        v = view(outcome.table, method)
        at = f" at {v.where()}" if v.point else ""
        out_console.print(heading(f"{method}: influence{at}, training sets by mean influence"))
        out_console.print(matrix_table(v, basic=basic_colours(out_console)))
    out_console.print("influence: positive means the training set helped the model fit the "
                      "test set (UnTrac, UnTrac-Inv, LDO: loss after - loss before)")
    from untrac_ray.cli.render import score_renderables
    from untrac_ray.results.score_views import summary_table

    for item in score_renderables(summary_table(outcome.scores),
                                  "scores against the ground truth, at the point fixed in "
                                  "advance"):
        out_console.print(item, highlight=False)


@app.command(rich_help_panel=RUN)
def validate(
    job: JobFile,
    settings: Settings = None,
    exact: Annotated[bool, typer.Option(
        "--exact", help="count every set's rows and tokens exactly: tokenize them as run "
        "does, into the cache run then reuses (minutes on big corpora), instead of "
        "estimating them")] = False,
) -> None:
    """Check a job and what it names; print it resolved, and what it will do.

    Data, columns, subsets, the model folder and its tokenizer, cache_dir; the resolved spec
    (paths absolute, defaults filled in) on stdout, then on stderr the model, tokenizer, each
    set's rows and tokens and the tasks of each method."""
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.inputs.preflight import check_job
    from untrac_ray.run.summary import job_summary

    try:
        spec = load_spec(job, settings or ())
        surveys = check_job(spec, exact=exact)
        sys.stdout.write(spec.to_yaml())
        sys.stdout.flush()
        for line in job_summary(spec, surveys, exact=exact):
            err_console.print(line, highlight=False, soft_wrap=True)
    except UntracError as err:
        raise fail(err) from None


@app.command(rich_help_panel=RUN)
def train(job: JobFile, quiet: Quiet = False, settings: Settings = None) -> None:
    """Train the job's base model on its training sets and save it (save_pretrained)."""
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.run.job_setup import prepare_data, train_model_for

    try:
        spec = load_spec(job, settings or ())
        with CliReporter(quiet) as reporter:
            reporter.stage("loading and tokenizing datasets")
            data = prepare_data(spec, reporter=reporter)
            folder = train_model_for(spec, data, reporter)
    except UntracError as err:
        raise fail(err) from None
    out_console.print(f"model saved to {folder}")


@app.command(rich_help_panel=RUN)
def run(
    job: JobFile,
    tracking_uri: TrackingUri = None,
    address: Address = None,
    quiet: Quiet = False,
    settings: Settings = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue this job's newest unfinished run (killed, failed, or left "
        "running by a dead driver): its finished tasks are restored, only the others run, and "
        "the same MLflow run ends FINISHED")] = False,
    resume_if_any: Annotated[bool, typer.Option(
        "--resume-if-any", help="as --resume when there is such a run, else start a new one "
        "(for retried cluster jobs)")] = False,
) -> None:
    """Run a job: train or reuse its model, unlearn on Ray actors, log to MLflow.

    Prints each method's matrix and how far to trust it; on a terminal live progress, in a log
    plain lines."""
    import os

    from untrac_ray.engine.signals import EXIT_CODE as SIGTERM_EXIT_CODE
    from untrac_ray.engine.signals import sigterm_as_interrupt, was_terminated
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.run.runner import run_job
    from untrac_ray.submit.staging import submission_tags

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # restoring tasks
    try:
        spec = load_spec(job, settings or ())
        with sigterm_as_interrupt(), CliReporter(quiet) as reporter:
            # Inside a Ray job, the run is tagged with its submission id.
            outcome = run_job(spec, tracking_uri, address, reporter, tags=submission_tags(),
                              resume="strict" if resume else "if_any" if resume_if_any else None)
    except UntracError as err:
        raise fail(err) from None
    except KeyboardInterrupt:  # the MLflow run ended KILLED, keeping the finished cells
        how = "terminated (SIGTERM)" if was_terminated() else "interrupted"
        err_console.print(f"{how}: the MLflow run is marked KILLED with the cells that "
                          "finished; `run --resume` continues it", highlight=False)
        raise typer.Exit(code=SIGTERM_EXIT_CODE if was_terminated() else INTERRUPTED) from None
    _print_matrices(outcome)
    from untrac_ray.cli.render import trust_renderables
    from untrac_ray.results.verdict import verdict

    for line in trust_renderables(verdict(outcome.agreement, outcome.scores,
                                          outcome.calibration)):
        out_console.print(line, highlight=False)
    if outcome.restored is not None:
        out_console.print("resumed: restored {} of {} tasks".format(*outcome.restored),
                          highlight=False)
    out_console.print(f"MLflow run {outcome.run_id} in {outcome.tracking_uri}", highlight=False)


@app.command(rich_help_panel=RUN)
def schema() -> None:
    """Print the job spec's JSON Schema (for editors: completion and checks of job files)."""
    import json

    from untrac_ray.inputs.spec import JobSpec

    sys.stdout.write(json.dumps(JobSpec.model_json_schema(), indent=2) + "\n")


from untrac_ray.cli.search import register as _register_search  # noqa: E402

_register_search(app, RUN)  # tune

from untrac_ray.cli.calibrate import register as _register_calibrate  # noqa: E402

_register_calibrate(app, RUN)  # calibrate

from untrac_ray.cli.browse import register as _register_browse  # noqa: E402

_register_browse(app, RESULTS)  # runs, show, compare, report, ui

from untrac_ray.cli.cluster import register as _register_cluster_commands  # noqa: E402

_register_cluster_commands(app, CLUSTER)  # submit, status, logs, stop, jobs

