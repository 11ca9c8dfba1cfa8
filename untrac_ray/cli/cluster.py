"""`untrac-ray submit / status / logs / stop / jobs`: jobs on a Ray cluster (Ray Jobs API).

Thin: each command parses its options, calls untrac_ray.submit (submit/staging.py,
submit/client.py), and prints. main.py calls `register(app)` to add them to the main app.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from untrac_ray.cli.common import Settings, err_console, fail, out_console
from untrac_ray.inputs.errors import UntracError

Address = Annotated[
    str | None,
    typer.Option("--address", help="the head's dashboard URL, e.g. http://HEAD:8265 "
                 "(default: RAY_ADDRESS)", show_default=False),
]
SubmissionId = Annotated[str, typer.Argument(
    metavar="SUBMISSION_ID", help="the submission id that `submit` printed",
    show_default=False)]
Follow = Annotated[bool, typer.Option("--follow", "-f", help="stream the logs until the job "
                                      "ends, then exit with its status")]


def _note(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _took(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _follow(cluster, job: str) -> None:
    """Stream a job's logs to stdout, then exit with its status (0 succeeded, 1 failed,
    3 stopped)."""
    from untrac_ray.submit.client import EXIT_CODES

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        status = cluster.follow(job, write)
    except KeyboardInterrupt:
        _note(f"stopped following; the job goes on (untrac-ray stop {job} ends it)")
        raise typer.Exit(code=130) from None
    style = "green" if status == "SUCCEEDED" else "red"
    _note(f"job {job}: [{style}]{status}[/]")
    raise typer.Exit(code=EXIT_CODES.get(status, 1))


def submit(
    job: Annotated[Path, typer.Argument(help="the job spec (YAML)", show_default=False)],
    address: Address = None,
    follow: Follow = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="your MLflow tracking server (default: "
                     "MLFLOW_TRACKING_URI, then the spec's tracking.uri)", show_default=False),
    ] = None,
    shared: Annotated[
        list[str] | None,
        typer.Option("--shared", help="a folder on a filesystem the cluster's nodes share "
                     "(repeatable): PATH, or LOCAL=CLUSTER when the nodes see it elsewhere; "
                     "paths under it are used in place, not uploaded", show_default=False),
    ] = None,
    python: Annotated[
        str,
        typer.Option("--python", help="interpreter on the head that has untrac-ray's "
                     "dependencies (the entrypoint runs in the head's environment)"),
    ] = "python",
    ship_package: Annotated[
        bool,
        typer.Option("--ship-package/--no-ship-package", help="upload this untrac_ray package "
                     "with the job (else the cluster's installed version runs)"),
    ] = True,
    pip: Annotated[
        list[str] | None,
        typer.Option("--pip", help="a pip requirement to install for the job (repeatable)",
                     show_default=False),
    ] = None,
    submission_id: Annotated[
        str | None, typer.Option("--submission-id", help="default: untrac-<name>-<random>",
                                 show_default=False),
    ] = None,
    entrypoint_gpus: Annotated[
        float | None,
        typer.Option("--entrypoint-gpus", help="GPUs reserved for the driver (it trains the "
                     "base model when the spec gives a config)", show_default=False),
    ] = None,
    entrypoint_cpus: Annotated[
        float | None, typer.Option("--entrypoint-cpus", help="CPUs reserved for the driver",
                                   show_default=False),
    ] = None,
    command: Annotated[
        str, typer.Option("--command", help="what the job runs: run or tune (its `search:`)"),
    ] = "run",
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the job's unfinished run (or search, "
                           "with --command tune) where it stopped: a resubmitted job")] = False,
    settings: Settings = None,
) -> None:
    """Submit a job to a Ray cluster with its files; print the submission id."""
    from untrac_ray.submit.client import Cluster
    from untrac_ray.submit.staging import (
        check_command,
        cluster_tracking_uri,
        package_size,
        stage_job,
    )

    try:
        # Everything local first: a bad command, a bad spec or a missing file never reaches
        # the cluster.
        check_command(f"{command} --resume" if resume and "--resume" not in command
                      else command)
        staged = stage_job(job, shared or (),
                           extra_bytes=package_size() if ship_package else 0,
                           overrides=settings or ())
        try:
            uri = cluster_tracking_uri(tracking_uri, staged.spec)
            cluster = Cluster(address)
            done = cluster.submit(
                staged, uri, python=python, ship_package=ship_package, pip=pip or (),
                submission_id=submission_id, entrypoint_num_gpus=entrypoint_gpus,
                entrypoint_num_cpus=entrypoint_cpus,
                command=f"{command} --resume" if resume and "--resume" not in command
                else command,
            )
        finally:
            staged.cleanup()
    except UntracError as err:
        raise fail(err) from None
    sys.stdout.write(done.submission_id + "\n")
    sys.stdout.flush()
    _note(f"submitted job {staged.spec.name!r} to {cluster.url}: {len(done.uploaded)} local "
          f"path(s) uploaded ({done.size / 2**20:.1f} MiB with the package), "
          f"{len(done.passed)} shared path(s) or URI(s) used in place; MLflow: "
          f"{done.tracking_uri}")
    if follow:
        try:
            _follow(cluster, done.submission_id)
        except UntracError as err:
            raise fail(err) from None
    _note(f"watch it: untrac-ray logs {done.submission_id} --follow")


def status(job: SubmissionId, address: Address = None) -> None:
    """Print a job's status, times and MLflow run."""
    from untrac_ray.submit.client import Cluster

    try:
        row = Cluster(address).info(job)
    except UntracError as err:
        raise fail(err) from None
    lines = [
        ("status", row.status), ("job", row.job_name or "-"), ("start", _when(row.start)),
        ("end", _when(row.end)), ("duration", _took(row.duration)),
        ("mlflow run", row.mlflow_run or "-"),
        ("tracking uri", row.metadata.get("untrac_ray.tracking_uri", "-")),
    ]
    if row.message:
        lines.append(("message", row.message.strip().splitlines()[-1]))
    for key, value in lines:
        out_console.print(f"{key:>12}: {value}", highlight=False, soft_wrap=True)


def logs(job: SubmissionId, address: Address = None, follow: Follow = False) -> None:
    """Print a job's logs (with --follow, stream them until it ends)."""
    from untrac_ray.submit.client import Cluster

    try:
        cluster = Cluster(address)
        if follow:
            _follow(cluster, job)
        sys.stdout.write(cluster.logs(job))
    except UntracError as err:
        raise fail(err) from None


def stop(
    job: SubmissionId,
    address: Address = None,
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for it to end")] = 30.0,
) -> None:
    """Stop a running job."""
    from untrac_ray.submit.client import Cluster

    try:
        cluster = Cluster(address)
        if not cluster.stop(job):
            out_console.print(f"{job}: already {cluster.status(job)}", highlight=False)
            return
        final = cluster.wait(job, wait)
    except UntracError as err:
        raise fail(err) from None
    out_console.print(f"{job}: {final}", highlight=False)


def jobs(
    address: Address = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="also jobs not from untrac-ray")] = False,
) -> None:
    """List this cluster's untrac-ray jobs: id, job name, status, start, duration, MLflow run."""
    from untrac_ray.submit.client import Cluster

    try:
        cluster = Cluster(address)
        rows = cluster.jobs(everything=all_jobs)
    except UntracError as err:
        raise fail(err) from None
    header = ("id", "job", "status", "start", "duration", "mlflow run")
    cells = [[r.submission_id, r.job_name or "-", r.status, _when(r.start), _took(r.duration),
              r.mlflow_run or "-"] for r in rows]
    widths = [max(len(c) for c in column) for column in zip(header, *cells, strict=True)]
    table = Table(title=f"untrac-ray jobs on {cluster.url}")
    for name, width in zip(header, widths, strict=True):
        table.add_column(name, no_wrap=True, min_width=width)  # ids are never cut
    colors = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}
    for row in cells:
        color = colors.get(row[2])
        table.add_row(*row[:2], f"[{color}]{row[2]}[/]" if color else row[2], *row[3:])
    # Piped output (not a terminal) gets the width the table needs.
    console = out_console if out_console.is_terminal else Console(
        width=sum(widths) + 3 * len(widths) + 1)
    console.print(table)
    if not rows:
        _note("no untrac-ray jobs on this cluster yet")


def register(app: typer.Typer, panel: str) -> None:
    """Add the cluster commands to the main app, in its `panel`."""
    for command in (submit, status, logs, stop, jobs):
        app.command(rich_help_panel=panel)(command)
