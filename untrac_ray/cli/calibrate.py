"""`untrac-ray calibrate`: which estimate to trust for a job, measured on a proxy of it.

Thin: parses options, calls calibrate/driver.calibrate_job, prints the candidates' scores, the
choice and the job file it wrote. main.py calls `register(app)`.
"""

from __future__ import annotations

from pathlib import Path
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
    fail,
    out_console,
)
from untrac_ray.cli.progress import CliReporter
from untrac_ray.inputs.errors import SpecError, UntracError


def _seeds(text: str, option: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise SpecError(f"{option}: expected seeds such as 1,2 (got {text!r})") from None


def _proxy_config(text: str | None) -> dict | None:
    """--proxy-config: a YAML file, or a mapping inline ({hidden_size: 64, ...})."""
    if text is None:
        return None
    import yaml

    path = Path(text)
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8") if path.is_file() else text)
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"--proxy-config: cannot read {text!r}: {err}".splitlines()[0]) from None
    if not isinstance(value, dict):
        raise SpecError(f"--proxy-config: expected a model config mapping, got {text!r}")
    return value


def register(app: typer.Typer, panel: str) -> None:
    @app.command(rich_help_panel=panel)
    def calibrate(
        job: JobFile,
        preset: Annotated[str, typer.Option(
            "--preset", help="the proxy's size: tiny (hidden 64, 2 layers), small (128, 2) or "
            "base (256, 4), the job's model family")] = "small",
        proxy_config: Annotated[str | None, typer.Option(
            "--proxy-config", help="the proxy's model config instead of a preset: a YAML file "
            "or an inline mapping (model_type defaults to the job's)",
            show_default=False)] = None,
        proxy_model: Annotated[str | None, typer.Option(
            "--proxy-model", help="a small base model folder, fine-tuned on the job's training "
            "sets as the job's `training` says, instead of a model trained from scratch",
            show_default=False)] = None,
        sample_rows: Annotated[int, typer.Option(
            "--sample-rows", min=1, help="rows sampled from each training set (seeded)")] = 2000,
        lds_subsets: Annotated[int, typer.Option(
            "--lds-subsets", min=4, help="random subsets of the training sets retrained for "
            "the LDS")] = 32,
        lds_noise: Annotated[int, typer.Option(
            "--lds-noise", min=0, help="of them, retrained again under another seed (the "
            "ceiling)")] = 4,
        select_seeds: Annotated[str, typer.Option(
            "--select-seeds", help="draws the choice is made on")] = "1",
        report_seeds: Annotated[str, typer.Option(
            "--report-seeds", help="held-out draws the choice is reported on")] = "2",
        candidates: Annotated[str | None, typer.Option(
            "--candidates", help="the estimates to try, comma-separated (default: all: "
            "untrac, untrac+stop, untrac+retain, untrac+kl, untrac+kl+stop, untrac+npo, "
            "untrac_inv, untrac_inv+retain, graddot, gradcos, tracin, ekfac)",
            show_default=False)] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", help="the job file to write (default: JOB's folder, "
            "<name>.calibrated.yaml)", show_default=False)] = None,
        tracking_uri: TrackingUri = None,
        address: Address = None,
        quiet: Quiet = False,
        settings: Settings = None,
    ) -> None:
        """Measure on a small proxy of the job which estimate predicts retraining best.

        Trains the proxy (the job's model family, shrunk, on a sample of its corpora), retrains
        it for the ground truth (leave-dataset-out and the LDS), runs every candidate estimate,
        chooses on the selection draws, reports on held-out ones, and writes a job file with the
        chosen method beside JOB. Started again with the same options it resumes."""
        import os

        from untrac_ray.calibrate.driver import CalibrateOptions, calibrate_job

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            options = CalibrateOptions(
                preset=preset, proxy_config=_proxy_config(proxy_config),
                proxy_model=proxy_model, sample_rows=sample_rows, lds_subsets=lds_subsets,
                lds_noise=lds_noise, select_seeds=_seeds(select_seeds, "--select-seeds"),
                report_seeds=_seeds(report_seeds, "--report-seeds"),
                candidates=[c.strip() for c in candidates.split(",") if c.strip()]
                if candidates else None, out=out)
            with CliReporter(quiet) as reporter:
                outcome = calibrate_job(job, settings or (), options, tracking_uri, address,
                                        reporter)
        except UntracError as err:
            raise fail(err) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: the finished units are kept in the calibration's "
                              "MLflow run; the same command continues it", highlight=False)
            raise typer.Exit(code=INTERRUPTED) from None
        _print(outcome)


def calibration_renderables(summary: dict) -> list:
    """A calibration's candidates (selection and held-out score, interval, the choice) and its
    verdict line: what `calibrate` ends with and `show` of its run prints."""
    from rich.table import Table

    from untrac_ray.cli.render import trust_renderables
    from untrac_ray.results.tables import method_title
    from untrac_ray.results.verdict import calibration_line

    s = summary
    score = s["score"].upper()
    table = Table(title=f"{score} of each estimate against retraining the proxy "
                  f"(selection draws {s['select_seeds']}, held-out {s['report_seeds']})",
                  title_justify="left")
    for col in ("estimate", f"selection {score}", f"held-out {score}", "95% interval", ""):
        table.add_column(col, justify="left" if col in ("estimate", "") else "right")
    for r in s["ranking"]:
        span = ("-" if r["held_out_low"] != r["held_out_low"]
                else f"[{r['held_out_low']:+.2f}, {r['held_out_high']:+.2f}]")
        mark = "chosen" if r["candidate"] == s["chosen"] else (
            "" if r["choosable"] else "not runnable on the job")
        held = "-" if r["held_out"] != r["held_out"] else f"{r['held_out']:+.2f}"
        table.add_row(method_title(r["candidate"]), f"{r['select']:+.2f}", held, span, mark)
    return [table, *trust_renderables([calibration_line(s)]), f"the proxy: {s['proxy']}"]


def _print(outcome) -> None:
    for item in calibration_renderables(outcome.summary):
        out_console.print(item, highlight=False)
    out_console.print(f"job file with the chosen method: {outcome.job_file}", highlight=False)
    out_console.print(f"MLflow run {outcome.run_id} in {outcome.tracking_uri} "
                      f"({outcome.seconds:.0f} s)", highlight=False)
