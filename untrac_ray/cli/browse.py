"""Browsing results from the terminal: `runs`, `show`, `compare`, and `ui` (the MLflow UI).

`register(app)` adds the commands to the main Typer app. Reading the store is
results/runs.py's job, computing what to show results/browse.py's, drawing it render.py's;
this module parses options and prints.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from untrac_ray.cli.common import PIPED_WIDTH, TrackingUri, err_console, fail, out_console
from untrac_ray.inputs.errors import InputError, UntracError


class Format(str, enum.Enum):
    text = "text"
    csv = "csv"
    json = "json"
    parquet = "parquet"


FormatOption = Annotated[
    Format,
    typer.Option("--format", help="text: coloured tables; csv, json, parquet: for scripts "
                 "(parquet needs --output)"),
]
Output = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="write to this file instead of stdout", dir_okay=False),
]
RunArg = Annotated[str, typer.Argument(help="a run id, a unique prefix of one, or a run name",
                                       show_default=False)]


def _uri(cli_value: str | None) -> str:
    from untrac_ray.results.store import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet downloads
    return resolve_tracking_uri(cli_value, None)


def _print(renderables: list, output: Path | None) -> None:
    """Rich renderables to stdout (piped: as wide as they need, values whole), or as plain
    text to a file."""
    if output is None:
        console = out_console if out_console.is_terminal else Console(
            width=PIPED_WIDTH, no_color=out_console.no_color)
        for r in renderables:
            console.print(r)
        return
    with open(output, "w", encoding="utf-8") as f:
        console = Console(file=f, width=160, no_color=True)
        for r in renderables:
            console.print(r)


def _emit(fmt: Format, frame, data, output: Path | None) -> None:
    from untrac_ray.results.browse import write_output

    def write_stdout(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write_output(fmt.value, frame, data, output, write_stdout)


def _load(run: str, uri: str):
    """A run's record and influence table (or the partial one a failed run kept)."""
    from untrac_ray.results.browse import BrowseError
    from untrac_ray.results.runs import get_run_record, read_run_table

    record = get_run_record(run, uri)
    table = read_run_table(record.run_id, uri, "influence")
    partial = False
    if table is None:
        table = read_run_table(record.run_id, uri, "influence_partial")
        partial = table is not None
    if table is None:
        why = f" (status {record.status}" + (f": {record.error})" if record.error else ")")
        raise BrowseError(f"run {record.run_id} has no influence table{why}")
    return record, table, partial


def runs(
    experiment: Annotated[str | None, typer.Option(
        "--experiment", "-e", help="only this experiment (default: all)")] = None,
    filter_string: Annotated[str | None, typer.Option(
        "--filter", help="an MLflow search filter, e.g. "
        "\"tags.\\\"untrac_ray.job\\\" = 'tiny'\" or \"attributes.status = 'FAILED'\"")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="most runs listed")] = 50,
    tracking_uri: TrackingUri = None,
    fmt: FormatOption = Format.text,
    output: Output = None,
) -> None:
    """List runs, newest first, with their best correlation with the ground truth.

    Job, methods, model, sets, status (STALE: its driver is gone), the top method's headline
    correlation, start and duration."""
    from untrac_ray.cli.render import runs_table
    from untrac_ray.results import browse
    from untrac_ray.results.runs import list_runs

    uri = _uri(tracking_uri)
    try:
        records = list_runs(uri, experiment, filter_string, limit)
        if fmt is Format.text:
            if not records:
                _print([f"no untrac-ray runs in {uri}"
                        + (f" (experiment {experiment})" if experiment else "")], output)
            else:
                width = out_console.width if out_console.is_terminal and not output else None
                _print([runs_table(records, f"untrac-ray runs in {uri}", width)],
                       output)
            return
        data = {"tracking_uri": uri, "runs": [browse.record_dict(r) for r in records]}
        _emit(fmt, browse.runs_frame(records), data, output)
    except UntracError as err:
        raise fail(err) from None


def _verdict(record, scores, uri: str) -> list:
    """How far to trust a stored run: its agreement tag, its score table and the summary of
    the calibration it cites (or, for a calibration's own run, its result)."""
    from untrac_ray.results.browse import parse_agreement
    from untrac_ray.results.calibration import run_calibration
    from untrac_ray.results.verdict import verdict

    return verdict(parse_agreement(record.tags.get("untrac_ray.agreement")), scores,
                   run_calibration(record.run_id, uri))


def _scores(record, uri):
    """A run's one score table (results/scores.py), None when it has none."""
    from untrac_ray.results.runs import read_run_table
    from untrac_ray.results.scores import ARTIFACT

    return read_run_table(record.run_id, uri, ARTIFACT)


def show(
    run: RunArg,
    method: Annotated[str | None, typer.Option(
        "--method", "-m", help="only this method (default: every method of the run)")] = None,
    point: Annotated[int | None, typer.Option(
        "--point", "-p", help="evaluation point of the unlearning trajectories (default: "
        "each method's last)")] = None,
    top: Annotated[int, typer.Option(
        "--top", "-k", min=1, help="training sets listed per test set")] = 3,
    examples: Annotated[bool, typer.Option(
        "--examples", help="the top training examples of the drill-down (UnTrac-Inv)")] = False,
    n_examples: Annotated[int, typer.Option(
        "--n-examples", min=1, help="examples per (test set, training set) with --examples")] = 3,
    tracking_uri: TrackingUri = None,
    fmt: FormatOption = Format.text,
    output: Output = None,
) -> None:
    """A run's matrices, top training sets, scores and how far to trust them.

    Rows sorted by mean influence, the top training sets per test set, the scores against the
    ground truth, where the figures are, the verdict. csv/parquet: the cells, tidy, ranked."""
    from untrac_ray.cli.render import basic_colours, show_renderables
    from untrac_ray.results import browse
    from untrac_ray.results.runs import artifact_folder, list_run_artifacts, read_run_table

    uri = _uri(tracking_uri)
    try:
        if _show_calibration(run, uri, fmt, output):
            return
        record, table, partial = _load(run, uri)
        try:
            views = browse.pick_views(table, method, point)
        except browse.BrowseError as err:
            raise browse.BrowseError(f"run {record.run_id}: {err}") from None
        scores = _scores(record, uri)
        drill = (read_run_table(record.run_id, uri, "examples/top_examples")
                 if examples else None)
        trust = _verdict(record, scores, uri)
        if fmt is Format.text:
            names = [Path(p).name for p in list_run_artifacts(record.run_id, uri, "figures")]
            figures = [f"{artifact_folder(record.run_id, uri)}/figures", *names] if names else []
            _print(show_renderables(record, views, top, scores, drill, examples, n_examples,
                                    figures, partial, basic_colours(out_console), trust),
                   output)
            return
        data = {**browse.show_json(record, views, top, scores, drill, examples, n_examples),
                "trust": trust}
        _emit(fmt, browse.cells_frame(views), data, output)
    except (UntracError, OSError) as err:
        raise fail(err) from None


def _show_calibration(run: str, uri: str, fmt, output) -> bool:
    """`show` of a calibration's parent run: its candidates and its choice (a calibration
    has no matrix of its own; its nested runs do). False for any other run."""
    from untrac_ray.cli.calibrate import calibration_renderables
    from untrac_ray.results.calibration import KIND, read_calibration
    from untrac_ray.results.runs import get_run_record, read_run_table

    record = get_run_record(run, uri)
    if record.tags.get("untrac_ray.kind") != KIND:
        return False
    summary = read_calibration(record.run_id, uri)
    if fmt is Format.text:
        _print(calibration_renderables(summary), output)
    else:
        _emit(fmt, read_run_table(record.run_id, uri, "calibration_scores"), summary, output)
    return True


def report(
    run: RunArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="the HTML file to write", dir_okay=False)] = Path("report.html"),
    tracking_uri: TrackingUri = None,
) -> None:
    """Write one self-contained HTML page of a run (figures embedded).

    How far to trust it, scores, agreement, each matrix and its heatmap, trajectories,
    scatters, the drill-down and the job."""
    from untrac_ray.results.report import RunReport, report_html, run_meta
    from untrac_ray.results.runs import (
        list_run_artifacts,
        read_run_bytes,
        read_run_table,
        read_run_text,
    )

    uri = _uri(tracking_uri)
    try:
        record, table, partial = _load(run, uri)
        scores = _scores(record, uri)
        trust = _verdict(record, scores, uri)
        names = [p for p in list_run_artifacts(record.run_id, uri, "figures")
                 if p.endswith(".png")]
        page = report_html(RunReport(
            run_id=record.run_id,
            title=f"untrac-ray: {record.job or record.run_name}"
                  + (" (unfinished: the cells it logged)" if partial else ""),
            meta=run_meta(record), table=table, trust=trust, scores=scores,
            examples=read_run_table(record.run_id, uri, "examples/top_examples"),
            job_yaml=read_run_text(record.run_id, uri, "job.yaml"),
            figures={n: read_run_bytes(record.run_id, uri, n) for n in names}))
        output.write_text(page, encoding="utf-8")
    except (UntracError, OSError) as err:
        raise fail(err) from None
    out_console.print(f"report of run {record.run_id}: {output.resolve()}", highlight=False,
                      soft_wrap=True)


def compare(
    run_a: RunArg,
    run_b: RunArg,
    method: Annotated[str | None, typer.Option(
        "--method", "-m", help="the method of both runs")] = None,
    method_a: Annotated[str | None, typer.Option("--method-a", help="the method of A")] = None,
    method_b: Annotated[str | None, typer.Option("--method-b", help="the method of B")] = None,
    point_a: Annotated[int | None, typer.Option(
        "--point-a", help="evaluation point of A (default: last)")] = None,
    point_b: Annotated[int | None, typer.Option(
        "--point-b", help="evaluation point of B (default: last)")] = None,
    tracking_uri: TrackingUri = None,
    fmt: FormatOption = Format.text,
    output: Output = None,
) -> None:
    """Two matrices side by side with their correlation.

    Two runs (a small proxy model against the large one), or two methods of one run (UnTrac
    against UnTrac-Inv, the default for one run)."""
    from untrac_ray.cli.render import basic_colours, compare_renderables
    from untrac_ray.results import browse
    from untrac_ray.results.score_views import describe

    uri = _uri(tracking_uri)
    try:
        record_a, table_a, _ = _load(run_a, uri)
        record_b, table_b, _ = (record_a, table_a, False) if run_b == run_a else _load(run_b, uri)
        same = record_a.run_id == record_b.run_id
        ma, mb = browse.compare_methods(browse.methods_of(table_a), browse.methods_of(table_b),
                                        same, method, method_a, method_b)
        try:
            va = browse.view(table_a, ma, point_a)
        except browse.BrowseError as err:
            raise browse.BrowseError(f"A (run {record_a.run_id}): {err}") from None
        try:
            vb = browse.view(table_b, mb, point_b)
        except browse.BrowseError as err:
            raise browse.BrowseError(f"B (run {record_b.run_id}): {err}") from None
        if same and va.method == vb.method and va.point == vb.point:
            raise browse.BrowseError(f"A and B are the same matrix ({ma} at point {va.point}); "
                                     "pick another run, --method-b or --point-b")
        label_a = f"{record_a.run_name or record_a.run_id[:8]} {va.method} @ {va.point}"
        label_b = f"{record_b.run_name or record_b.run_id[:8]} {vb.method} @ {vb.point}"
        comparison = browse.compare_views(va, vb, label_a, label_b)
        comparison.scores_a = describe(_scores(record_a, uri), va.method)
        comparison.scores_b = describe(_scores(record_b, uri), vb.method)
        if fmt is Format.text:
            _print(compare_renderables(comparison, basic_colours(out_console)), output)
            return
        _emit(fmt, browse.compare_frame(comparison),
              browse.compare_json(comparison, record_a, record_b), output)
    except (UntracError, OSError) as err:
        raise fail(err) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


UI_NOTE_EVERY_S = 15.0  # while the server starts, a line this often (a busy machine is slow)


def _wait_until_up(proc: subprocess.Popen, address: str, timeout: float) -> bool:
    """Whether the server answered /health within `timeout` s (False: it exited or is slow);
    says on stderr every UI_NOTE_EVERY_S that it is still starting."""
    start = time.monotonic()
    deadline, note = start + timeout, start + UI_NOTE_EVERY_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
        if time.monotonic() >= note:
            err_console.print(f"  still starting ({time.monotonic() - start:.0f} s of "
                              f"{timeout:g} s)", highlight=False)
            note += UI_NOTE_EVERY_S
    return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def ui(
    tracking_uri: TrackingUri = None,
    port: Annotated[int, typer.Option(
        "--port", min=0, max=65535, help="port on 127.0.0.1 (0: any free port)")] = 5000,
    start_timeout: Annotated[float, typer.Option(
        "--start-timeout", help="seconds to wait for the server to answer")] = 180.0,
) -> None:
    """Start the MLflow UI for the tracking store on 127.0.0.1 and print its address."""
    from untrac_ray.results.runs import ui_command
    from untrac_ray.results.store import store_exists

    uri = _uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        out_console.print(f"{uri} is a tracking server: its UI is at {uri}", highlight=False)
        return
    if not store_exists(uri):
        raise fail(InputError(f"no MLflow store at {uri} (run a job first, or pass "
                                "--tracking-uri)"))
    if port == 0:
        port = _free_port()
    elif not _port_free(port):
        raise fail(InputError(f"port {port} on 127.0.0.1 is in use; pass --port (0: any "
                                "free port)"))
    address = f"http://127.0.0.1:{port}"
    err_console.print(f"starting the MLflow UI for {uri} on {address} ...", highlight=False)
    log = tempfile.NamedTemporaryFile("w+b", prefix="untrac-ray-ui-", suffix=".log",
                                      delete=False)
    command, store = ui_command(uri, port)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **store})

    def interrupt(signum, frame):  # SIGTERM stops the server too
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    failed = False
    try:
        if not _wait_until_up(proc, address, start_timeout):
            failed = True
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-15:]
            why = (f"did not answer within {start_timeout:g} s (a busy machine may need more: "
                   "--start-timeout)" if proc.poll() is None else
                   f"exited with code {proc.returncode}")
            raise fail(UntracError(f"the MLflow UI {why}:\n" + "\n".join(tail)))
        out_console.print(f"MLflow UI: {address}  (store {uri}; Ctrl+C to stop)",
                          highlight=False, soft_wrap=True)
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(proc)
        signal.signal(signal.SIGTERM, previous)
        log.close()
        if not failed:
            Path(log.name).unlink(missing_ok=True)
        else:
            err_console.print(f"server log: {log.name}", highlight=False)


def register(app: typer.Typer, panel: str) -> None:
    """Add the browse commands (runs, show, compare, report, ui) to the CLI, in its `panel`."""
    for command in (runs, show, compare, report, ui):
        app.command(rich_help_panel=panel)(command)
