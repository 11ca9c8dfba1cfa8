"""Hyperparameter searches of the unlearning settings on Ray Tune (`untrac-ray tune`).

The driver prepares everything once: the data and the base model (put into Ray's object store
once, every trial's actors read them there), the base losses, and the ground truth (read from
`ground_truth.run_id`, or the job's `ldo` run once before the first trial). Each Tune trial
then gets its actors through its placement group and runs its settings' unlearning
trajectories in segments (segments.py), one evaluation point at a time on every set, scoring
the estimate after each point and reporting it to Tune, so ASHA can stop a poor trial early.

Only the driver writes to MLflow (tracking.SearchRun): a Tune callback turns every trial's
start, reports and end into a nested child run of the search's parent run. Tune's state lives
under `search.storage_path`; a search whose driver was killed resumes with `resume=True`,
running only the trials that had not finished.

Nothing here imports mlflow, parses arguments or prints.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray.tune import Callback

from untrac_ray.engine import Engine, ensure_ray
from untrac_ray.errors import UntracError
from untrac_ray.results import COLUMNS, influence_table, unlearning_cells
from untrac_ray.runner import (
    PreparedData,
    Reporter,
    eval_sample,
    load_ground_truth,
    prepare_data,
    resolve_model,
    weight_sets,
)
from untrac_ray.schedule import eval_schedules
from untrac_ray.scoring import ALL_CELLS, MEAN_OVER_TESTS, score_table, summary, truth_matrix
from untrac_ray.segments import SegmentTask
from untrac_ray.spec import (
    GROUND_TRUTH,
    UNLEARNING_METHODS,
    GroundTruthSpec,
    JobSpec,
    SearchSpec,
    UnlearnSpec,
    spec_hash,
)
from untrac_ray.tasks import BASE, EvalTask, LdoTask
from untrac_ray.workbench import TaskResult

STATE_FILE = "untrac_search.json"  # beside Tune's state: the parent run, the spec's hash
OBJECTIVE = "objective"
CELL_FIELDS = COLUMNS  # a report's cells travel as lists in this order
_SCORE_FIELD = {"pearson_mean": (MEAN_OVER_TESTS, "pearson"),
                "spearman_mean": (MEAN_OVER_TESTS, "spearman"),
                "pearson_all": (ALL_CELLS, "pearson"), "spearman_all": (ALL_CELLS, "spearman")}


class SearchError(UntracError):
    """A search cannot start or resume (nothing to resume, a trial that cannot fit)."""


# ------------------------------------------------------------------ the space and the settings


def tune_space(search: SearchSpec) -> dict[str, dict[str, Any]]:
    """The search space as Ray Tune domains, nested by method: {"untrac": {"learning_rate":
    tune.loguniform(...)}}. Integer ranges are inclusive; a grid search uses grid_search."""
    from ray import tune

    space: dict[str, dict[str, Any]] = {}
    for key, domain in search.space.items():
        method, setting = key.split(".", 1)
        low_high = domain.values
        if domain.kind == "choice":
            value = (tune.grid_search(low_high) if search.algorithm == "grid"
                     else tune.choice(low_high))
        elif domain.kind == "loguniform":
            value = tune.loguniform(*low_high)
        elif domain.kind == "uniform":
            value = tune.uniform(*low_high)
        elif domain.kind == "randint":
            value = tune.randint(low_high[0], low_high[1] + 1)
        else:
            value = tune.lograndint(low_high[0], low_high[1] + 1)
        space.setdefault(method, {})[setting] = value
    return space


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's nested config as '<method>.<setting>' -> value."""
    return {f"{m}.{k}": v for m, part in config.items() if isinstance(part, dict)
            for k, v in part.items()}


def scored_methods(spec: JobSpec) -> list[str]:
    """The unlearning methods a search runs and scores."""
    assert spec.search is not None
    return spec.search.objective.methods or [
        m for m in UNLEARNING_METHODS if m in spec.methods.enabled()]


def trial_settings(spec: JobSpec, config: dict[str, Any]) -> dict[str, UnlearnSpec]:
    """Each scored method's settings: the job's, with the trial's values put in."""
    out = {}
    for method in scored_methods(spec):
        base: UnlearnSpec = getattr(spec.methods, method)
        update = {k: _plain(v) for k, v in (config.get(method) or {}).items()}
        out[method] = UnlearnSpec.model_validate({**base.model_dump(), **update})
    return out


def _plain(value: Any) -> Any:
    """NumPy scalars (from samplers) as Python values."""
    return value.item() if isinstance(value, np.generic) else value


def job_with(spec: JobSpec, config: dict[str, Any], name: str | None = None,
             ground_truth: GroundTruthSpec | None = None) -> JobSpec:
    """The job a trial's settings make: the scored methods' settings replaced, no search.

    With `ground_truth`, the job's `ldo` is replaced by that earlier result (the search's
    leave-dataset-out, computed once), so the job does not retrain.
    """
    out = spec.model_copy(deep=True)
    for method, settings in trial_settings(spec, config).items():
        setattr(out.methods, method, settings)
    out.search = None
    if name:
        out.name = name
    if ground_truth is not None and out.methods.ldo is not None:
        out.methods.ldo = None
        out.ground_truth = ground_truth
    return JobSpec.model_validate(out.model_dump())


# ------------------------------------------------------------------ the objective


def load_objective(target: str) -> Callable[[pd.DataFrame, pd.DataFrame | None], float]:
    """A user metric from 'package.module:function' or '/path/file.py:function'."""
    where, name = target.split(":")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise SearchError(f"search.objective.function: no file {where}")
            module_spec = importlib.util.spec_from_file_location(
                f"untrac_user_metric_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except SearchError:
        raise
    except Exception as err:  # noqa: BLE001
        raise SearchError(f"search.objective.function: cannot import {where}: "
                          f"{type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SearchError(f"search.objective.function: {where} has no function {name!r}")
    return fn


def objective_of(table: pd.DataFrame, truth: pd.DataFrame | None, spec: JobSpec,
                 metric_fn: Callable | None = None) -> tuple[float, dict[str, float]]:
    """The objective of one evaluation round: per method (its cells at one point), and their
    mean (NaN when every method's is NaN)."""
    objective = spec.search.objective
    per_method: dict[str, float] = {}
    if metric_fn is None:
        where, stat = _SCORE_FIELD[objective.metric]
        scores = score_table(table, truth)
        for method, part in scores[scores["test_set"] == where].groupby("method"):
            per_method[str(method)] = float(part[stat].iloc[-1])
    else:
        for method, part in table.groupby("method"):
            per_method[str(method)] = float(metric_fn(part.reset_index(drop=True), truth))
    values = np.array(list(per_method.values()), dtype=float)
    value = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return value, per_method


def _better(a: float, b: float, mode: str) -> bool:
    """True when a beats b (NaN never beats anything; anything beats NaN)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if mode == "max" else a < b


# ------------------------------------------------------------------ a trial


@dataclass
class TrialContext:
    """What every trial receives (through tune.with_parameters): the job, references to the
    weights and tokenized tables in the object store (put once by the driver), the base
    losses and the ground truth (computed once by the driver)."""

    spec: JobSpec
    weights: dict[str, ray.ObjectRef]
    tables: dict[str, ray.ObjectRef]
    pad_id: int
    eval_indices: dict[str, np.ndarray]
    n_rows: dict[str, int]
    train: list[str]
    test: list[str]
    base_losses: dict[str, float]
    truth: pd.DataFrame | None


@dataclass
class _Trajectory:
    method: str
    forget: str
    evaluate: tuple[str, ...]
    settings: UnlearnSpec
    steps: tuple[int, ...]  # the step of each evaluation point (schedule.py)


def _trajectories(ctx: TrialContext, settings: dict[str, UnlearnSpec]) -> list[_Trajectory]:
    out = []
    for method, s in settings.items():
        forget, evaluate = (ctx.test, ctx.train) if method == "untrac_inv" else (
            ctx.train, ctx.test)
        schedules = eval_schedules(s, {name: ctx.n_rows[name] for name in forget})
        for name in forget:
            out.append(_Trajectory(method, name, tuple(evaluate), s, schedules[name]))
    return out


def _gather(refs: list[ray.ObjectRef]) -> list[TaskResult]:
    """Results of tasks on actors; an UntracError raised in one (a NaN loss) is raised here."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as err:
        if isinstance(err.cause, UntracError):
            raise type(err.cause)(str(err.cause)) from None
        raise UntracError(f"a trial task failed: {err.cause!r}") from None
    except RayActorError as err:
        raise UntracError(f"a trial's actor died ({str(err).splitlines()[0]})") from None


def _pg_options() -> dict[str, Any]:
    """Actor options that keep a trial's actors inside the trial's placement group."""
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    if pg is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_capture_child_tasks=True)}


_LOCAL: dict[str, Any] = {}  # the workbench of this trial process, reused by later trials


def _local_bench(ctx: TrialContext):
    """A Workbench in this (trial) process, built once per process from the shared weights
    (Tune reuses the process for later trials); trajectories of earlier trials dropped."""
    import torch

    from untrac_ray.engine import _ObjectStoreWeights
    from untrac_ray.precision import configure_tf32
    from untrac_ray.segments import forget_state
    from untrac_ray.tokenization import TokenizedSet
    from untrac_ray.workbench import Workbench

    key = ctx.weights[BASE].hex()
    if _LOCAL.get("key") != key:
        res = ctx.spec.resources
        torch.set_num_threads(max(1, int(res.cpus_per_actor)))
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        configure_tf32(res.tf32, device)
        names = list(ctx.tables)
        tables = ray.get([ctx.tables[n] for n in names])
        sets = {n: TokenizedSet.from_table(n, t, ctx.pad_id)
                for n, t in zip(names, tables, strict=True)}
        bench = Workbench(_ObjectStoreWeights(ctx.weights), sets, ctx.eval_indices,
                          ctx.spec.evaluation.batch_size, device, precision=res.precision)
        _LOCAL.clear()
        _LOCAL.update(key=key, bench=bench)
    bench = _LOCAL["bench"]
    forget_state(bench)
    return bench


def trial_resources(spec: JobSpec):
    """A trial's placement group: one actor runs in the trial's own process (its bundle holds
    the actor's CPUs and GPUs); several are actors in bundles of their own."""
    from ray import tune

    r, n = spec.resources, spec.search.actors_per_trial
    bundle = {"CPU": r.cpus_per_actor, "GPU": r.gpus_per_actor}
    return tune.PlacementGroupFactory([bundle] if n == 1 else [{}] + [bundle] * n)


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: unlearn every set with the trial's settings, one evaluation point at a
    time on all of them (each set at its own step for the point), and report the objective
    after each point (a round)."""
    from ray import tune

    started = time.time()
    trial_id = tune.get_context().get_trial_id() or "trial"
    spec = ctx.spec
    settings = trial_settings(spec, config)
    paths = _trajectories(ctx, settings)
    rounds = max(len(p.steps) for p in paths)  # a method's trajectories share its points
    metric_fn = load_objective(spec.search.objective.function) if (
        spec.search.objective.function) else None
    mode = spec.search.objective.mode
    best = float("nan")
    latest: dict[int, list[dict]] = {}  # trajectory -> its cells at its latest point
    with contextlib.ExitStack() as stack:
        if spec.search.actors_per_trial == 1:
            bench = _local_bench(ctx)

            def run(pairs: list[tuple[int, SegmentTask]]) -> list[TaskResult]:
                return [bench.run(t) for _, t in pairs]
        else:
            resources = spec.resources.model_copy(
                update={"num_actors": spec.search.actors_per_trial})
            engine = stack.enter_context(Engine(
                resources, ctx.weights, ctx.tables, ctx.pad_id, ctx.eval_indices,
                spec.evaluation.batch_size, max_useful_actors=len(paths),
                actor_options=_pg_options()))

            def run(pairs: list[tuple[int, SegmentTask]]) -> list[TaskResult]:
                # A trajectory stays on one actor, where its state is kept between rounds.
                return _gather([engine.submit(i % engine.size, t) for i, t in pairs])

        for r in range(rounds):
            pairs = [(i, SegmentTask(f"{trial_id}/{i}", p.method, p.forget, p.evaluate,
                                     p.settings, p.steps[r], last=r == len(p.steps) - 1))
                     for i, p in enumerate(paths) if r < len(p.steps)]
            new_rows: list[dict] = []
            seconds = 0.0
            for (i, _), result in zip(pairs, run(pairs), strict=True):
                p = paths[i]
                (step, losses), = result.losses.items()
                latest[i] = unlearning_cells(p.method, p.forget, r + 1, step, losses,
                                             ctx.base_losses)
                new_rows += latest[i]
                seconds += result.seconds
            # each method at its latest point (a method with fewer points keeps its last)
            table = influence_table([c for cells in latest.values() for c in cells],
                                    ctx.train, ctx.test)
            now, per_method = objective_of(table, ctx.truth, spec, metric_fn)
            best = now if _better(now, best, mode) or r == 0 else best
            value = best if spec.search.objective.step == "best" else now
            tune.report({
                OBJECTIVE: value, "objective_now": now, "round": r + 1,
                "rounds": rounds, "tasks": len(pairs), "compute_seconds": seconds,
                "trial_started": started,
                **{f"objective_{m}": v for m, v in per_method.items()},
                "cells": json.dumps([[c[k] for k in CELL_FIELDS] for c in new_rows]),
            })


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


def _error_line(text: str) -> str:
    """The one-line message of an error raised in a trial (from Tune's traceback text)."""
    found = re.findall(r"(?:\w+\.)*(\w+(?:Error|Exception)): (.+)", text)
    return found[-1][1].strip() if found else (text.strip().splitlines() or [""])[-1]


def _status_of(report: dict[str, Any] | None) -> str:
    if not report:
        return "failed"
    return "completed" if report.get("round", 0) >= report.get("rounds", 1) else "stopped early"


class _SearchLogger:
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
        status = "failed" if error else _status_of(reports[-1] if reports else None)
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
        from untrac_ray import plots

        table = influence_table(rows, self.train, self.test)
        handle.log_table(table, "influence")
        for method in dict.fromkeys(table["method"]):
            handle.log_figure(plots.heatmap(table, method, self.train, self.test),
                              f"figures/heatmap_{method}.png")
        if self.truth is not None:
            scores = score_table(table, self.truth)
            handle.log_scores(scores, summary(scores))

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


_LOGGERS: dict[str, _SearchLogger] = {}  # by search name, in the driver process


class SearchCallback(Callback):
    """A Tune callback that hands the driver's trial events to the search's logger.

    Tune pickles its callbacks with the experiment; this one holds only the search's name and
    finds the live logger (MLflow client, CLI) in the driver that runs or resumes the search.
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        _LOGGERS[self.key].started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        _LOGGERS[self.key].result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        _LOGGERS[self.key].completed(trial.trial_id, trial.config)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        _LOGGERS[self.key].completed(trial.trial_id, trial.config, _trial_error(trial))


def _trial_error(trial) -> str:
    """A failed trial's one-line error (its error file is written locally before storage)."""
    text = None
    with contextlib.suppress(Exception):
        local = trial.error_file
        text = Path(local).read_text() if local and Path(local).is_file() else None
    if not text:
        with contextlib.suppress(Exception):
            text = trial.get_error()
    return _error_line(str(text)) if text else "trial failed (see Tune's error file)"


# ------------------------------------------------------------------ storage and resume


def storage_path(spec: JobSpec) -> str:
    """Where Tune keeps the search: search.storage_path, else <cache_dir>/tune."""
    given = spec.search.storage_path
    return given if given else str(Path(spec.cache_dir or ".untrac-ray").resolve() / "tune")


def _fs(uri: str):
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def search_key(spec: JobSpec) -> str:
    """Hash of what a resumed search must share with the interrupted one."""
    dump = spec.model_dump(mode="json", exclude={"tracking": True, "resources": True,
                                                 "search": {"storage_path", "max_concurrent"}})
    return spec_hash(dump)


def _write_state(uri: str, name: str, state: dict[str, Any]) -> None:
    fs, root = _fs(uri)
    fs.create_dir(f"{root}/{name}", recursive=True)
    with fs.open_output_stream(f"{root}/{name}/{STATE_FILE}") as f:
        f.write(json.dumps(state, indent=2, sort_keys=True).encode())


def list_searches(uri: str) -> list[dict[str, Any]]:
    """Every search kept under a storage path (its state, plus `name` and `path`)."""
    import pyarrow.fs as pafs

    fs, root = _fs(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_FILE}") as f:
                state = json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            continue
        base = uri if "://" in uri else root
        out.append({**state, "name": info.base_name,
                    "path": f"{base.rstrip('/')}/{info.base_name}"})
    return sorted(out, key=lambda s: s.get("created", 0))


def find_resumable(spec: JobSpec) -> dict[str, Any]:
    """The newest unfinished search of this job (same spec) under its storage path."""
    uri = storage_path(spec)
    mine = [s for s in list_searches(uri) if s.get("job") == spec.name]
    same = [s for s in mine if s.get("spec_key") == search_key(spec)]
    open_ = [s for s in same if not s.get("finished")]
    if open_:
        return open_[-1]
    if same:
        raise SearchError(f"nothing to resume: the searches of job {spec.name!r} in {uri} "
                          f"all finished (latest: {same[-1]['name']}, MLflow run "
                          f"{same[-1]['parent_run_id']}); run without --resume for a new one")
    if mine:
        raise SearchError(f"nothing to resume: job {spec.name!r} changed since its searches "
                          f"in {uri} (the spec's hash differs); run without --resume")
    raise SearchError(f"nothing to resume: no search of job {spec.name!r} in {uri} "
                      "(search.storage_path); run without --resume")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "search"


# ------------------------------------------------------------------ the whole search


@dataclass
class SearchOutcome:
    """What a finished (or interrupted) search produced."""

    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    trials: pd.DataFrame  # one row per trial: id, run id, status, rounds, objective, settings
    best: dict[str, Any] | None  # trial_id, run_id, config (flat), objective
    best_job_yaml: str | None
    best_job_path: str | None
    ground_truth_tasks: int  # leave-dataset-out tasks run by this driver (0: read or reused)
    interrupted: bool = False
    resumed: bool = False
    settings: list[str] = field(default_factory=list)
    total: int = 0  # trials the search runs in all


def _driver_tasks(spec: JobSpec, data: PreparedData, compute_truth: bool
                  ) -> tuple[list, list]:
    """The driver's own work: base losses of every evaluated set, and LDO (once)."""
    sets = dict.fromkeys(data.train + data.test)
    base = [EvalTask((n,)) for n in sets]
    ldo: list = []
    if compute_truth:
        seeds = spec.methods.ldo.seeds or [spec.training.seed]
        ldo = [LdoTask(left_out, tuple(data.train), tuple(data.test), spec.training, seed)
               for seed in seeds for left_out in [None, *data.train]]
    return base, ldo


def _logged_base_losses(run, uri: str, data: PreparedData) -> dict[str, float] | None:
    """The base losses an interrupted search logged (None when they are missing)."""
    from untrac_ray.tracking import read_run_text

    text = read_run_text(run.run_id, uri, "base_losses.json")
    losses = json.loads(text) if text else None
    if not losses or set(losses) != set(data.train + data.test):
        return None
    return {k: float(v) for k, v in losses.items()}


def _ldo_rows(spec: JobSpec, results: list[TaskResult], train: list[str], test: list[str]
              ) -> tuple[list[dict], list[dict]]:
    """The ground truth's cells (mean over the LDO seeds) and the cells of every seed."""
    from untrac_ray.methods import plan_ldo

    plan = plan_ldo(spec, train, test)
    rows = plan.assemble(results, {})
    return rows, plan.extras.get("ldo_seeds", [])


def _check_fits(spec: JobSpec) -> None:
    """Refuse a trial that the whole cluster could never hold (it would wait forever)."""
    s, r = spec.search, spec.resources
    need_cpu = r.cpus_per_actor * s.actors_per_trial
    need_gpu = r.gpus_per_actor * s.actors_per_trial
    total = ray.cluster_resources()
    if need_cpu > total.get("CPU", 0) + 1e-9 or need_gpu > total.get("GPU", 0) + 1e-9:
        raise SearchError(
            f"search.actors_per_trial: a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU "
            f"({s.actors_per_trial} actors of resources.cpus_per_actor/gpus_per_actor) but "
            f"the Ray cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU"
        )


def _searcher(spec: JobSpec):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = spec.search
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=s.seed)
    # A generator (not a Searcher) takes its concurrency limit itself; Tune ignores
    # max_concurrent_trials for it.
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent or 0)


def _scheduler(spec: JobSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sch = spec.search.scheduler
    if sch.kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=sch.max_t or 100_000,
                             grace_period=sch.grace_period,
                             reduction_factor=sch.reduction_factor)
    return FIFOScheduler()


def run_search(
    spec: JobSpec,
    tracking_uri: str | None = None,
    address: str | None = None,
    reporter: SearchReporter | None = None,
    resume: bool = False,
    tags: dict[str, str] | None = None,
) -> SearchOutcome:
    """Run (or resume) the job's hyperparameter search on Ray Tune, logged to MLflow.

    Bad input fails before any trial starts (and, for a new search, before the parent run is
    created). The ground truth is read from `ground_truth.run_id`, or computed once here
    with the job's `ldo` (and read back from the parent run on resume).
    """
    from ray import tune

    from untrac_ray.tracking import (
        SearchRun,
        check_store,
        read_influence,
        resolve_tracking_uri,
    )

    if spec.search is None:
        raise SearchError("the job has no search section; add `search:` (see README) or use "
                          "`untrac-ray run`")
    reporter = reporter or SearchReporter()
    search = spec.search
    storage = storage_path(spec)
    previous = find_resumable(spec) if resume else None
    if previous is not None:
        uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or previous["tracking_uri"])
        name = previous["name"]
    else:
        uri = resolve_tracking_uri(tracking_uri, spec)
        name = f"{_slug(spec.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    metric_fn = load_objective(search.objective.function) if search.objective.function else None
    del metric_fn  # imported here only to fail early; every trial imports it again
    check_store(uri)  # seconds, before any data, training or Ray

    reporter.stage("loading and tokenizing datasets")
    data = prepare_data(spec)
    truth = None
    if spec.ground_truth:
        truth = load_ground_truth(spec, uri, data.train, data.test)
    elif previous is not None and previous.get("truth_in_parent"):
        reporter.stage("reading the ground truth computed before the interruption")
        truth = truth_matrix(read_influence(previous["parent_run_id"], uri))
    compute_truth = truth is None and GROUND_TRUTH in spec.methods.enabled()
    model_dir = resolve_model(spec, data, reporter)
    weights, _ = weight_sets(spec, data, model_dir)
    if not compute_truth:
        weights = {BASE: weights[BASE]}
    indices = eval_sample(spec, data)
    methods = scored_methods(spec)

    started_ray = ensure_ray(spec.resources, address)
    try:
        _check_fits(spec)
        # The weights and tables go into the object store once, for the driver's engine and
        # for every trial (trials get the references).
        by_id = {id(w): ray.put(w) for w in weights.values()}
        weight_refs = {n: by_id[id(w)] for n, w in weights.items()}
        table_refs = {n: ray.put(t) for n, t in data.tables.items()}
        base_tasks, ldo_tasks = _driver_tasks(spec, data, compute_truth)
        with SearchRun(spec, uri, tags, run_id=previous and previous["parent_run_id"],
                       name=name) as run:
            run.set_tag("search", name)
            run.set_tag("model_dir", str(model_dir))
            run.set_tag("storage_path", storage)
            base_losses = _logged_base_losses(run, uri, data) if previous else None
            if base_losses is None or ldo_tasks:
                with Engine(spec.resources, weight_refs, table_refs,
                            data.tokenizer.pad_token_id, indices, spec.evaluation.batch_size,
                            max_useful_actors=max(len(ldo_tasks), len(base_tasks))) as engine:
                    reporter.stage(f"base losses of {len(base_tasks)} sets on {engine.size} "
                                   "actors")
                    base_losses = {}
                    for result in engine.map(base_tasks):
                        base_losses.update(result.losses[0])
                    if ldo_tasks:
                        reporter.stage(f"ground truth: leave-dataset-out, {len(ldo_tasks)} "
                                       f"trainings on {engine.size} actors (once for the "
                                       "search)")
                        ldo_results = engine.map(ldo_tasks)
            if ldo_tasks:
                rows, per_seed = _ldo_rows(spec, ldo_results, data.train, data.test)
                ldo = influence_table(rows, data.train, data.test)
                truth = truth_matrix(ldo)
                run.log_table(ldo, "influence")  # the parent serves as a ground_truth run
                run.log_table(pd.DataFrame(per_seed), "ldo_seeds")
            run.log_json(base_losses, "base_losses.json")
            if previous is None:
                run.log_json({"space": {k: d.model_dump(exclude_none=True)
                                        for k, d in search.space.items()},
                              "objective": search.objective.model_dump(),
                              "trials": search.num_trials(), "algorithm": search.algorithm,
                              "scheduler": search.scheduler.model_dump()}, "search.json")
            state = {"job": spec.name, "spec_key": search_key(spec), "parent_run_id":
                     run.run_id, "tracking_uri": uri, "created": time.time(),
                     "truth_in_parent": bool(ldo_tasks) or bool(
                         previous and previous.get("truth_in_parent")),
                     "finished": False}
            if previous is not None:
                state["created"] = previous.get("created", state["created"])
            _write_state(storage, name, state)

            ctx = TrialContext(spec, {BASE: weight_refs[BASE]}, table_refs,
                               data.tokenizer.pad_token_id, indices,
                               {n: t.num_rows for n, t in data.tables.items()}, data.train,
                               data.test, base_losses, truth)
            trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                            trial_resources(spec))
            logger = _SearchLogger(run, spec, reporter, data.train, data.test, truth, name)
            _LOGGERS[name] = logger
            os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # resume loses < 1 s
            path = f"{storage.rstrip('/')}/{name}"
            if previous is not None:
                tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                           resume_errored=False, restart_errored=False)
            else:
                tuner = tune.Tuner(
                    trainable, param_space=tune_space(search),
                    tune_config=tune.TuneConfig(
                        metric=OBJECTIVE, mode=search.objective.mode,
                        search_alg=_searcher(spec), scheduler=_scheduler(spec),
                        num_samples=1 if search.algorithm == "grid" else search.num_trials(),
                        max_concurrent_trials=search.max_concurrent if
                        search.algorithm == "optuna" else None,
                        reuse_actors=search.actors_per_trial == 1),  # keeps its workbench
                    run_config=tune.RunConfig(
                        name=name, storage_path=storage, verbose=0,
                        callbacks=[SearchCallback(name)],
                        failure_config=tune.FailureConfig(max_failures=search.max_failures)),
                )
            reporter.search_started(name, search.num_trials(), list(search.space),
                                    previous is not None)
            for view in logger.earlier:  # the trials that ended before the interruption
                reporter.trial_update(view)
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # Tune's own banner
                    grid = tuner.fit()
            finally:
                _LOGGERS.pop(name, None)
            outcome = _finish(run, spec, logger, grid, name, path, uri, truth, methods)
            outcome.ground_truth_tasks = len(ldo_tasks)
            outcome.resumed = previous is not None
            run.interrupted = outcome.interrupted  # the parent run ends KILLED, not FINISHED
            state["finished"] = not outcome.interrupted
            _write_state(storage, name, state)
    finally:
        if started_ray:
            ray.shutdown()
    if outcome.interrupted:
        raise SearchInterrupted(outcome)
    return outcome


class SearchInterrupted(SearchError):
    """The search stopped before every trial ran (Ctrl-C); `--resume` finishes it."""

    def __init__(self, outcome: SearchOutcome) -> None:
        ended = int((outcome.trials["status"] != "pending").sum())
        super().__init__(f"the search {outcome.name} was interrupted after {ended} of "
                         f"{outcome.total} trials; finish it with --resume")
        self.outcome = outcome


def _finish(run, spec: JobSpec, logger: _SearchLogger, grid, name: str, path: str, uri: str,
            truth: pd.DataFrame | None, methods: list[str]) -> SearchOutcome:
    """After Tune: close any trial run a killed driver left open, then log the parent's
    trials table, best trial, best configuration (as a job file) and figures."""
    search = spec.search
    settings = list(search.space)
    rows = []
    for i in range(len(grid)):
        result = grid[i]
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.split("_", 1)[-1]
        config = result.config or {}
        error = _error_line(str(result.error)) if result.error else None
        if error:
            status = "failed"
        elif metrics.get("done"):
            status = _status_of(metrics)
        else:
            status = "pending"  # interrupted before it finished
        before = logger.children.get(trial_id)
        if (status != "pending" and trial_id not in logger.views
                and (before is None or before[1] == "RUNNING")):
            # Tune finished it but the driver was killed before its run was closed.
            frame = result.metrics_dataframe
            reports = frame.to_dict("records") if frame is not None else []
            logger.replay(trial_id, config, reports, error)
        view = logger.views.get(trial_id)
        rows.append({
            "trial_id": trial_id, "run_id": view.run_id if view else (before or ("",))[0],
            "status": status, "rounds_run": int(metrics.get("round", 0) or 0),
            "rounds": int(metrics.get("rounds", 0) or 0),
            OBJECTIVE: float(metrics.get(OBJECTIVE, float("nan"))),
            **{f"{OBJECTIVE}_{m}": float(metrics.get(f"{OBJECTIVE}_{m}", float("nan")))
               for m in methods},
            **{k: _plain(v) for k, v in flat_config(config).items()},
            "error": error or "",
        })
    trials = pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)
    trials.attrs["mode"] = search.objective.mode
    interrupted = bool((trials["status"] == "pending").any()) or len(trials) < (
        search.num_trials())
    for trial_id, view in logger.views.items():  # cut off by Ctrl-C: KILLED until resumed
        if view.status == "running" and trial_id in logger.handles:
            run.end_child(logger.handles.pop(trial_id), "KILLED")
    best = _best(trials, spec, settings)
    run.log_table(trials, "trials")
    counts = trials["status"].value_counts()
    run.log_metrics({"trials_completed": float(counts.get("completed", 0)),
                     "trials_stopped_early": float(counts.get("stopped early", 0)),
                     "trials_failed": float(counts.get("failed", 0))})
    best_yaml = best_path = None
    if best is not None:
        best_yaml, best_path = _log_best(run, spec, best, trials, name, path, uri, truth,
                                         methods)
    _log_search_figures(run, spec, trials)
    return SearchOutcome(name, run.run_id, uri, path, trials, best, best_yaml, best_path, 0,
                         interrupted=interrupted, settings=settings, total=search.num_trials())


def _best(trials: pd.DataFrame, spec: JobSpec, settings: list[str]) -> dict[str, Any] | None:
    """The trial with the best objective among those that ran (completed or stopped)."""
    done = trials[trials["status"].isin(["completed", "stopped early"])]
    finite = done[np.isfinite(done[OBJECTIVE].astype(float))]
    if finite.empty:
        return None
    pick = (finite[OBJECTIVE].idxmax() if spec.search.objective.mode == "max"
            else finite[OBJECTIVE].idxmin())
    b = trials.loc[pick]
    return {"trial_id": b["trial_id"], "run_id": b["run_id"], "objective": float(b[OBJECTIVE]),
            "status": b["status"], "config": {k: _plain(b[k]) for k in settings}}


def _log_best(run, spec: JobSpec, best: dict[str, Any], trials: pd.DataFrame, name: str,
              path: str, uri: str, truth: pd.DataFrame | None, methods: list[str]
              ) -> tuple[str, str | None]:
    """The best trial on the parent run: metric, tags, and its settings as a job file."""
    run.log_metrics({"best_objective": best["objective"]})
    run.set_tag("best_trial", best["trial_id"])
    run.set_tag("best_run_id", best["run_id"])
    run.set_tag("best_config", json.dumps({k: _jsonable(v) for k, v in best["config"].items()}))
    row = trials.set_index("trial_id").loc[best["trial_id"]]
    if spec.search.objective.function is None:  # browse tools read per-method correlations
        from untrac_ray.tracking import HEADLINE_TAG

        per = ",".join(f"{m}={row[f'{OBJECTIVE}_{m}']:.3f}" for m in methods)
        run.set_tag(spec.search.objective.metric.split("_")[0] == "pearson" and HEADLINE_TAG
                    or "best_objective_by_method", per)
    gt = (GroundTruthSpec(run_id=run.run_id, tracking_uri=uri)
          if truth is not None and spec.ground_truth is None else None)
    best_spec = job_with(spec, _nest(best["config"]), ground_truth=gt)  # same name: same model
    header = (f"# Best configuration of search {name} (MLflow run {run.run_id}):\n"
              f"# trial {best['trial_id']}, {OBJECTIVE} {best['objective']:.6g} "
              f"({_objective_label(spec)}).\n")
    if gt is not None:
        header += ("# ground_truth: the search's leave-dataset-out, computed once; remove it "
                   "(or put methods.ldo back) for another model.\n")
    text = header + best_spec.to_yaml()
    run.log_text(text, "best_job.yaml")
    try:
        fs, root = _fs(path)
        with fs.open_output_stream(f"{root}/best_job.yaml") as f:
            f.write(text.encode())
        return text, f"{path}/best_job.yaml"
    except OSError:
        return text, None


def _log_search_figures(run, spec: JobSpec, trials: pd.DataFrame) -> None:
    """The objective against each setting; for a grid over two settings, a heatmap."""
    from untrac_ray.search_plots import objective_heatmap, objective_vs_settings

    search = spec.search
    settings = list(search.space)
    if trials.empty:
        return
    log_scale = {k: d.kind in ("loguniform", "lograndint") or _spans_decades(d.values)
                 for k, d in search.space.items()}
    run.log_figure(objective_vs_settings(trials, settings, _objective_label(spec), log_scale),
                   "figures/objective_vs_settings.png")
    if search.algorithm == "grid" and len(settings) == 2:
        values = trials.pivot_table(index=settings[0], columns=settings[1], values=OBJECTIVE,
                                    aggfunc="first", dropna=False)
        run.log_figure(objective_heatmap(values, f"{spec.name}: {OBJECTIVE}",
                                         _objective_label(spec)), "figures/objective_grid.png")


def _spans_decades(values: list[Any]) -> bool:
    """Positive numbers two or more orders of magnitude apart (a log axis suits them)."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return len(numbers) == len(values) and min(numbers, default=0) > 0 and (
        max(numbers) / min(numbers) >= 100)


def _objective_label(spec: JobSpec) -> str:
    o = spec.search.objective
    what = f"user metric {o.function}" if o.function else o.metric
    return what + (" (best point)" if o.step == "best" else "")


def _jsonable(value: Any) -> Any:
    value = _plain(value)
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        method, setting = key.split(".", 1)
        if isinstance(value, float) and math.isnan(value):
            value = None
        out.setdefault(method, {})[setting] = _plain(value)
    return out
