"""`untrac-ray calibrate JOB`: which estimate to trust for a job, measured on a proxy of it.

From the job it builds the proxy (proxy.py), then runs each draw (study.py: the ground truth
and every candidate) for the selection seeds and then the held-out seeds, decides on the
first and reports on the second (choice.py), and writes a job file beside the user's with the
chosen method and a comment saying why. Everything is one MLflow parent run; each job of a
draw is a run nested under it, recorded in the parent when it finishes. Started again with
the same settings, a calibration reopens its parent run: finished units are read back,
a unit whose driver died is resumed with its finished tasks, so a SIGKILL costs only the
tasks that were running (results/calibration.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from untrac_ray.calibrate.candidates import pick_candidates
from untrac_ray.calibrate.choice import decide, write_job_file
from untrac_ray.calibrate.proxy import DEFAULT_PRESET, DEFAULT_SAMPLE_ROWS, proxy_spec
from untrac_ray.calibrate.study import Draw, Unit, draw_rows, run_draw
from untrac_ray.inputs.errors import SpecError, TrackingError
from untrac_ray.inputs.fingerprints import results_key
from untrac_ray.inputs.loading import apply_overrides, load_spec
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_methods import LdsSpec
from untrac_ray.results.calibration import (
    SUMMARY,
    CalibrationRun,
    find_calibration,
    unit_tables,
)
from untrac_ray.results.runs import find_resumable_run
from untrac_ray.results.store import TAG_PREFIX, check_store, resolve_tracking_uri
from untrac_ray.results.verdict import calibration_line
from untrac_ray.run.job_setup import Reporter
from untrac_ray.run.runner import run_job


@dataclass
class CalibrateOptions:
    """What `calibrate` takes beside the job (docs/cli.md: calibrate)."""

    preset: str = DEFAULT_PRESET
    proxy_config: dict[str, Any] | None = None
    proxy_model: str | None = None
    sample_rows: int = DEFAULT_SAMPLE_ROWS
    lds_subsets: int = 32
    lds_noise: int = 4
    select_seeds: list[int] = field(default_factory=lambda: [1])
    report_seeds: list[int] = field(default_factory=lambda: [2])
    candidates: list[str] | None = None
    out: Path | None = None

    def check(self) -> None:
        if not self.select_seeds or not self.report_seeds:
            raise SpecError("calibrate: give at least one selection and one held-out seed")
        if set(self.select_seeds) & set(self.report_seeds):
            raise SpecError("calibrate: --select-seeds and --report-seeds must not share a "
                            "seed (the held-out draws are held out)")
        if self.proxy_model is not None and self.proxy_config is not None:
            raise SpecError("calibrate: give --proxy-model or --proxy-config, not both")


@dataclass
class CalibrationOutcome:
    """A finished calibration: its parent run, every draw's rows, the summary, the job file."""

    run_id: str
    tracking_uri: str
    rows: pd.DataFrame
    summary: dict[str, Any]
    job_file: Path
    proxy: JobSpec
    seconds: float


def proxy_words(proxy: JobSpec, options: CalibrateOptions) -> str:
    """The proxy in words, for the job file's comment and the summary."""
    model = (f"the base model {options.proxy_model}, fine-tuned" if options.proxy_model
             else "{model_type} of hidden size {h}, {n} layers, trained from scratch".format(
                 model_type=proxy.model.config.get("model_type"),
                 h=proxy.model.config.get("hidden_size", proxy.model.config.get("n_embd", "?")),
                 n=proxy.model.config.get("num_hidden_layers",
                                          proxy.model.config.get("n_layer", "?"))))
    return (f"{model}, on a seeded sample of at most {options.sample_rows} rows of each "
            f"training set; ground truth: leave-dataset-out and the LDS over "
            f"{options.lds_subsets} retrained subsets")


def calibration_key(proxy: JobSpec, options: CalibrateOptions, names: list[str]) -> str:
    """The key a calibration is found again by: the proxy's results key and every setting
    that changes what is run or chosen."""
    material = {"proxy": results_key(proxy), "candidates": names,
                "select": options.select_seeds, "report": options.report_seeds,
                "lds": [options.lds_subsets, options.lds_noise]}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _unit_runner(parent: CalibrationRun, seed: int, uri: str, address: str | None,
                 reporter: Reporter):
    def run_unit(label: str, spec: JobSpec) -> Unit:
        done = parent.finished_unit(seed, label)
        if done is not None:
            reporter.stage(f"draw {seed}, {label}: finished earlier (run {done['run_id']})")
            tables = unit_tables(done["run_id"], uri)
            if tables["influence"] is None:
                raise TrackingError(f"calibration unit {label} of draw {seed}: run "
                                    f"{done['run_id']} has no influence table")
            return Unit(done["run_id"], tables["influence"], done["seconds"],
                        tables["lds_subsets"], tables["ldo_seeds"])
        resume = None
        try:
            find_resumable_run(uri, spec, results_key(spec), parent=parent.run_id)
            resume = "strict"
        except TrackingError:
            pass
        reporter.stage(f"draw {seed}, {label}: "
                       + ("resuming its run" if resume else "running"))
        outcome = run_job(spec, uri, address, reporter, tags=parent.child_tags(seed, label),
                          resume=resume)
        unit = Unit.of(outcome)
        parent.save_unit(seed, label, {"run_id": unit.run_id, "seconds": unit.seconds})
        return unit

    return run_unit


def choosable(spec: JobSpec, names: list[str]) -> list[str]:
    """The candidates the user's own job can run: TracIn needs a model the job trains."""
    return [n for n in names if not (n == "tracin" and not spec.model.trained_by_job)]


def calibrate_job(job: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  options: CalibrateOptions | None = None, tracking_uri: str | None = None,
                  address: str | None = None, reporter: Reporter | None = None
                  ) -> CalibrationOutcome:
    """The whole calibration of a job file (module docstring). Bad input (the job, the proxy,
    the candidates, the store) fails before any run is created."""
    options = options or CalibrateOptions()
    options.check()
    reporter = reporter or Reporter()
    began = time.perf_counter()
    job = Path(job)
    spec = load_spec(job, overrides)
    proxy = proxy_spec(spec, options.preset, options.proxy_config, options.proxy_model,
                       options.sample_rows)
    if len(spec.data.train) < 4:
        raise SpecError(f"calibrate: the job has {len(spec.data.train)} training sets; the "
                        "LDS it scores estimates with needs at least 4 (with fewer, retraining "
                        "on random halves gives too few subsets to rank)")
    candidates = pick_candidates(options.candidates, len(spec.data.test))
    names = [c.name for c in candidates]
    lds = LdsSpec(subsets=options.lds_subsets, noise_subsets=options.lds_noise)
    uri = resolve_tracking_uri(tracking_uri, spec)
    check_store(uri)
    key = calibration_key(proxy, options, names)
    found = find_calibration(uri, proxy, key)
    words = proxy_words(proxy, options)
    with CalibrationRun(proxy, uri, key, run_id=found.run_id if found else None,
                        tags={TAG_PREFIX + "methods": ",".join(names)},
                        start_time=int(time.time() * 1000)) as parent:
        if found is None:
            parent.log_json({"candidates": names, "select_seeds": options.select_seeds,
                             "report_seeds": options.report_seeds, "proxy": words},
                            "calibration_plan.json")
        rows: list[dict] = []
        held_out: list[Draw] = []
        for phase, seeds in (("select", options.select_seeds),
                             ("report", options.report_seeds)):
            for seed in seeds:
                role = "selection" if phase == "select" else "held out"
                reporter.stage(f"calibration draw {seed} ({role}): {len(names)} candidates "
                               "on the proxy")
                draw = run_draw(proxy, seed, candidates, lds,
                                _unit_runner(parent, seed, uri, address, reporter), uri)
                for name, why in draw.skipped.items():
                    reporter.stage(f"draw {seed}: {name} skipped: {why}")
                rows += draw_rows(draw, candidates, phase)
                if phase == "report":
                    held_out.append(draw)
        frame = pd.DataFrame(rows)
        summary = decide(frame, held_out, choosable(spec, names))
        summary.update(proxy=words, candidates=names, sample_rows=options.sample_rows,
                       lds_subsets=options.lds_subsets,
                       seconds=time.perf_counter() - began)
        parent.log_table(frame, "calibration_scores")
        raw = apply_overrides(yaml.safe_load(job.read_text(encoding="utf-8")), overrides)
        path = write_job_file(job, raw, summary, parent.run_id, words, options.out,
                              tracking_uri)
        load_spec(path)  # what it wrote is a job `validate` and `run` accept
        parent.log_text(path.read_text(encoding="utf-8"), "calibrated_job.yaml")
        parent.log_json(summary, SUMMARY)
        parent.set_tag("chosen", summary["chosen"])
        parent.set_tag("verdict", calibration_line(summary))
    return CalibrationOutcome(parent.run_id, uri, frame, summary, path, proxy,
                              time.perf_counter() - began)
