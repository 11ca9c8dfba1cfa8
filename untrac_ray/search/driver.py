"""Hyperparameter searches of the unlearning settings on Ray Tune (`untrac-ray tune`).

The driver's set-up is the one `run` uses (run/session.py): the data and the base model (put into
Ray's object store once, every trial's actors read them there). Its own tasks, the base losses
and the ground truth (the job's `ldo`, run once before the first trial, unless read from
`ground_truth.run_id`), are stored in the search's parent run as they finish, so a resumed
search restores them as a resumed `run` does. Each Tune trial then gets its actors through its
placement group and runs its settings' unlearning trajectories in segments (trial.py,
methods/segments.py), one evaluation point at a time on every set, scoring the estimate after
each point and reporting it to Tune, so ASHA can stop a poor trial early.

Beside it: trial.py (one trial), space.py (the space, a trial's settings, the objective),
reporting.py (every trial as a nested MLflow run, through a Tune callback; only the driver
writes) and state.py (the search's state beside Tune's, which `resume=True` reads to run only
the trials that had not finished).

Nothing here imports mlflow, parses arguments or prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from untrac_ray.inputs.fingerprints import results_key
from untrac_ray.inputs.loading import absolute_sqlite_uri
from untrac_ray.inputs.redaction import has_secret, learn, redact, split_credentials
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import GROUND_TRUTH, GroundTruthSpec
from untrac_ray.methods.plans import plan_ldo, plan_lds
from untrac_ray.methods.tasks import BASE, EvalTask
from untrac_ray.results.scoring import truth_matrix
from untrac_ray.results.tables import influence_table
from untrac_ray.run.runner import data_metrics
from untrac_ray.run.session import open_session, run_tasks
from untrac_ray.search.reporting import (
    LOGGERS,
    SearchCallback,
    SearchReporter,
    TrialLogger,
    error_line,
    result_status,
)
from untrac_ray.search.space import (
    OBJECTIVE,
    SearchError,
    flat_config,
    job_with,
    load_objective,
    plain_value,
    scored_methods,
    tune_space,
)
from untrac_ray.search.state import (
    find_resumable,
    slug,
    storage_fs,
    storage_path,
    write_state,
)
from untrac_ray.search.trial import TrialContext, run_trial, trial_resources


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

    from untrac_ray.results.store import check_store, resolve_tracking_uri
    from untrac_ray.results.tracking import SearchRun

    if spec.search is None:
        raise SearchError("the job has no search section; add `search:` (docs/searches.md) or use "
                          "`untrac-ray run`")
    reporter = reporter or SearchReporter()
    began = int(time.time() * 1000)  # the parent run's start: it covers the data stage
    search = spec.search
    storage = storage_path(spec)
    previous = find_resumable(spec) if resume else None
    if previous is not None:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _stored_uri(previous)
        learn(uri)  # its password, if any, is masked wherever it would be printed or logged
        name = previous["name"]
    else:
        uri = resolve_tracking_uri(tracking_uri, spec)
        name = f"{slug(spec.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = absolute_sqlite_uri(uri)
    metric_fn = load_objective(search.objective.function) if search.objective.function else None
    del metric_fn  # imported here only to fail early; every trial imports it again
    check_store(uri)  # seconds, before any data, training or Ray

    methods = scored_methods(spec)
    compute_truth = spec.ground_truth is None and GROUND_TRUTH in spec.methods.enabled()
    compute_lds = "lds" in spec.methods.enabled()
    retrained = [GROUND_TRUTH] * compute_truth + ["lds"] * compute_lds
    resumed_run = None
    if previous is not None:
        resumed_run = (previous["parent_run_id"], previous.get("fingerprints", {}))
    with open_session(spec, address=address, reporter=reporter, uri=uri,
                      spec_key=results_key(spec), resume=resumed_run,
                      methods=retrained) as session:
        _check_fits(spec)
        data = session.data
        base_tasks = [EvalTask((n,)) for n in dict.fromkeys(data.train + data.test)]
        ldo_plan = (plan_ldo(spec, data.train, data.test, session.n_rows) if compute_truth
                    else None)
        lds_plan = (plan_lds(spec, data.train, data.test, session.n_rows) if compute_lds
                    else None)
        ldo_tasks = ldo_plan.tasks if ldo_plan is not None else []
        lds_tasks = lds_plan.tasks if lds_plan is not None else []
        with SearchRun(spec, uri, tags, run_id=previous and previous["parent_run_id"],
                       name=name, start_time=began) as run:
            run.set_tag("search", name)
            run.set_tag("model_dir", str(session.model_dir))
            run.set_tag("storage_path", storage)
            run.log_metrics(data_metrics(session.data))
            for key, value in session.fingerprints.items():
                run.set_tag(key, value)
            # The driver's own tasks (base losses, LDO once), stored in the parent run as they
            # finish: a resumed search restores them, like a resumed `run`.
            store = session.task_store(run)
            driver_tasks = [*base_tasks, *ldo_tasks, *lds_tasks]
            restored = store.restore(driver_tasks)
            if previous is not None:
                reporter.stage(f"restored {len(restored)} of {len(driver_tasks)} tasks of the "
                               "search's driver")
                run.set_tag("restored_tasks", str(len(restored)))
            if len(restored) < len(driver_tasks):
                reporter.stage(f"base losses of {len(base_tasks)} sets"
                               + (f" and leave-dataset-out, {len(ldo_tasks)} trainings (once "
                                  "for the search)" if ldo_tasks else "")
                               + (f" and LDS, {len(lds_tasks)} trainings on subsets"
                                  if lds_tasks else ""))
            results, _ = run_tasks(session, store, driver_tasks, None, reporter.task_retried,
                                   restored=restored)
            base_losses = {}
            for result in results[:len(base_tasks)]:
                base_losses.update(result.losses[0])
            truth = session.truth
            if ldo_plan is not None:
                ldo = influence_table(ldo_plan.assemble(
                    results[len(base_tasks):len(base_tasks) + len(ldo_tasks)], {}),
                    data.train, data.test)
                truth = truth_matrix(ldo)
                run.log_table(ldo, "influence")  # the parent serves as a ground_truth run
                run.log_table(pd.DataFrame(ldo_plan.extras["ldo_seeds"]), "ldo_seeds")
            lds_subsets = None
            if lds_plan is not None:
                lds_plan.assemble(results[len(base_tasks) + len(ldo_tasks):], {})
                lds_subsets = pd.DataFrame(lds_plan.extras["lds_subsets"])
                run.log_table(lds_subsets, "lds_subsets")
            run.log_json(base_losses, "base_losses.json")
            if previous is None:
                run.log_json({"space": {k: d.model_dump(exclude_none=True)
                                        for k, d in search.space.items()},
                              "objective": search.objective.model_dump(),
                              "trials": search.num_trials(), "algorithm": search.algorithm,
                              "scheduler": search.scheduler.model_dump()}, "search.json")
            clean_uri, credentials = split_credentials(uri)  # never stored in Tune's storage
            state = {"job": spec.name, "spec_key": results_key(spec), "parent_run_id":
                     run.run_id, "tracking_uri": clean_uri, "credentials": bool(credentials),
                     "created": time.time(), "fingerprints": session.fingerprints,
                     "finished": False}
            if previous is not None:
                state["created"] = previous.get("created", state["created"])
            write_state(storage, name, state)

            ctx = TrialContext(spec, {BASE: session.weights[BASE]}, session.tables,
                               data.tokenizer.pad_token_id, session.indices, session.n_rows,
                               data.train, data.test, base_losses, truth, lds_subsets)
            trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                            trial_resources(spec))
            logger = TrialLogger(run, spec, reporter, data.train, data.test, truth, name)
            LOGGERS[name] = logger
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
                LOGGERS.pop(name, None)
            outcome = _finish(run, spec, logger, grid, name, path, uri, truth, methods)
            outcome.ground_truth_tasks = sum(  # LDO and LDS trainings it ran (not restored)
                i not in restored for i in range(len(base_tasks), len(driver_tasks)))
            outcome.resumed = previous is not None
            run.interrupted = outcome.interrupted  # the parent run ends KILLED, not FINISHED
            state["finished"] = not outcome.interrupted
            write_state(storage, name, state)
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


def _finish(run, spec: JobSpec, logger: TrialLogger, grid, name: str, path: str, uri: str,
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
        error = error_line(str(result.error)) if result.error else None
        status = result_status(metrics, error)
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
            **{k: plain_value(v) for k, v in flat_config(config).items()},
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
            "status": b["status"], "config": {k: plain_value(b[k]) for k in settings}}


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
        from untrac_ray.results.store import HEADLINE_TAG

        per = ",".join(f"{m}={row[f'{OBJECTIVE}_{m}']:.3f}" for m in methods)
        run.set_tag(spec.search.objective.metric.split("_")[0] == "pearson" and HEADLINE_TAG
                    or "best_objective_by_method", per)
    gt = (GroundTruthSpec(run_id=run.run_id, tracking_uri=split_credentials(uri)[0])
          if truth is not None and spec.ground_truth is None else None)
    best_spec = job_with(spec, _nest(best["config"]), ground_truth=gt)  # same name: same model
    header = (f"# Best configuration of search {name} (MLflow run {run.run_id}):\n"
              f"# trial {best['trial_id']}, {OBJECTIVE} {best['objective']:.6g} "
              f"({objective_label(spec)}).\n")
    if gt is not None:
        header += ("# ground_truth: the search's leave-dataset-out, computed once; remove it "
                   "(or put methods.ldo back) for another model.\n")
    body = best_spec.to_yaml()
    if has_secret(body):  # a data URI's token, say: the job file had it as ${VAR}
        header += ("# credentials are masked (***): put back the ${VAR} references of your "
                   "job file.\n")
    text = header + redact(body)
    run.log_text(text, "best_job.yaml")
    try:
        fs, root = storage_fs(path)
        with fs.open_output_stream(f"{root}/best_job.yaml") as f:
            f.write(text.encode())
        return text, f"{path}/best_job.yaml"
    except OSError:
        return text, None


def _stored_uri(previous: dict[str, Any]) -> str:
    """The tracking URI a search to resume logged to, as its state keeps it: without its
    credentials, which MLflow then reads from MLFLOW_TRACKING_USERNAME/PASSWORD."""
    uri = previous["tracking_uri"]
    if previous.get("credentials") and not (os.environ.get("MLFLOW_TRACKING_USERNAME")
                                            or os.environ.get("MLFLOW_TRACKING_TOKEN")):
        raise SearchError(f"search {previous['name']} logged to {uri} with credentials, which "
                          "are never stored: pass --tracking-uri with them, or set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return uri


def _log_search_figures(run, spec: JobSpec, trials: pd.DataFrame) -> None:
    """The objective against each setting; for a grid over two settings, a heatmap."""
    from untrac_ray.search.plots import objective_heatmap, objective_vs_settings

    search = spec.search
    settings = list(search.space)
    if trials.empty:
        return
    log_scale = {k: d.kind in ("loguniform", "lograndint") or _spans_decades(d.values)
                 for k, d in search.space.items()}
    run.log_figure(objective_vs_settings(trials, settings, objective_label(spec), log_scale),
                   "figures/objective_vs_settings.png")
    if search.algorithm == "grid" and len(settings) == 2:
        values = trials.pivot_table(index=settings[0], columns=settings[1], values=OBJECTIVE,
                                    aggfunc="first", dropna=False)
        run.log_figure(objective_heatmap(values, f"{spec.name}: {OBJECTIVE}",
                                         objective_label(spec)), "figures/objective_grid.png")


def _spans_decades(values: list[Any]) -> bool:
    """Positive numbers two or more orders of magnitude apart (a log axis suits them)."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return len(numbers) == len(values) and min(numbers, default=0) > 0 and (
        max(numbers) / min(numbers) >= 100)


def objective_label(spec: JobSpec) -> str:
    """What the search's objective is, in words (for tables and figures)."""
    o = spec.search.objective
    what = f"user metric {o.function}" if o.function else o.metric
    return what + (" (best point)" if o.step == "best" else "")


def _jsonable(value: Any) -> Any:
    value = plain_value(value)
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        method, setting = key.split(".", 1)
        if isinstance(value, float) and math.isnan(value):
            value = None
        out.setdefault(method, {})[setting] = plain_value(value)
    return out
