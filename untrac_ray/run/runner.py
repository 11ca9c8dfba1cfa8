"""A job from start to end: set-up (session.py), tasks on the engine, results into MLflow.

The CLI (local `run`, and a job submitted to a cluster) calls `run_job`; nothing here parses
arguments or prints. Every finished task is stored in the job's MLflow run as it completes,
so a job whose driver died continues with `resume` (only the missing tasks run again).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from untrac_ray.inputs.errors import RunAdopted, StoreLost, TrackingError
from untrac_ray.inputs.fingerprints import results_key
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import UNLEARNING_METHODS
from untrac_ray.methods.cells import average_members, influence_rows
from untrac_ray.methods.plans import plan_methods
from untrac_ray.methods.tasks import EkfacTask, EvalTask, LdoTask, TaskResult, UnlearnTask
from untrac_ray.results import plots
from untrac_ray.results.calibration import SUMMARY as CALIBRATION_SUMMARY
from untrac_ray.results.calibration import read_calibration
from untrac_ray.results.runs import find_resumable_run
from untrac_ray.results.score_views import headline_rows
from untrac_ray.results.scores import ESTIMATE, score_frame
from untrac_ray.results.scoring import agreement, ensemble_agreement, truth_matrix
from untrac_ray.results.store import TAG_PREFIX, check_store, resolve_tracking_uri
from untrac_ray.results.tables import influence_table, matrix, top_examples
from untrac_ray.results.tracking import PARENT_TAG, JobRun, metric_key
from untrac_ray.run.job_setup import Reporter
from untrac_ray.run.session import (
    DATA_KEY,
    MODEL_KEY,
    SPEC_KEY,
    JobSession,
    open_session,
    run_tasks,
)

Resume = Literal["strict", "if_any"] | None


@dataclass
class JobOutcome:
    """What a finished job produced."""

    run_id: str
    tracking_uri: str
    table: pd.DataFrame
    base_losses: dict[str, float]
    model_dir: Path
    seconds_by_method: dict[str, float] = field(default_factory=dict)
    scores: pd.DataFrame | None = None  # the one score table (results/scores.py)
    examples: pd.DataFrame | None = None
    extras: dict = field(default_factory=dict)
    restored: tuple[int, int] | None = None  # a resumed run: (tasks restored, tasks in all)
    agreement: dict[str, float] = field(default_factory=dict)  # scoring.agreement, ensembles
    calibration: dict | None = None  # the summary of the calibration the job cites


def find_run_to_resume(spec: JobSpec, uri: str, resume: Resume, reporter: Reporter,
                       parent: str | None = None) -> tuple[str, dict[str, str]] | None:
    """The run `resume` continues (its id and recorded fingerprints), or None for a new run;
    `parent`: one nested under that run. "strict" refuses in one line when there is none (or
    when the data or model changed since, checked by open_session); "if_any" then starts a
    new run."""
    if resume is None:
        return None
    try:
        found = find_resumable_run(uri, spec, results_key(spec), parent=parent)
    except TrackingError as err:
        if resume == "strict":
            raise
        reporter.stage(f"{err}: starting a new run")
        return None
    reporter.stage(f"resuming run {found.run_id} ({found.status.lower()}"
                   f"{', driver gone' if found.stale else ''})")
    keys = (SPEC_KEY, DATA_KEY, MODEL_KEY)
    return found.run_id, {k: found.tags[TAG_PREFIX + k] for k in keys
                          if TAG_PREFIX + k in found.tags}


def run_job(
    spec: JobSpec,
    tracking_uri: str | None = None,
    address: str | None = None,
    reporter: Reporter | None = None,
    tags: dict[str, str] | None = None,
    resume: Resume = None,
) -> JobOutcome:
    """Run a whole job and log it as one MLflow run; returns the tidy influence table.

    Everything that can fail on bad input (tracking store, data, model folder, spec,
    ground-truth run, a run to resume that does not match) fails before the MLflow run is
    created or reopened. A failure afterwards marks the run FAILED, Ctrl-C or SIGTERM KILLED,
    keeping the cells and the finished tasks; `resume` continues such a run to FINISHED.
    """
    reporter = reporter or Reporter()
    began = int(time.time() * 1000)  # the run's start: its duration covers the data stage
    uri = resolve_tracking_uri(tracking_uri, spec)
    check_store(uri)  # seconds, before any data, training or Ray
    calibration = None
    if spec.calibration is not None:  # a job `calibrate` wrote: its verdict cites the proxy
        calibration = read_calibration(spec.calibration.run_id,
                                       spec.calibration.tracking_uri or uri)
    previous = find_run_to_resume(spec, uri, resume, reporter,
                                  parent=(tags or {}).get(PARENT_TAG))
    with open_session(spec, address=address, reporter=reporter, uri=uri, resume=previous,
                      new_run_if_changed=resume == "if_any") as session:
        with JobRun(spec, uri, tags, run_id=session.resumed_run, start_time=began) as run:
            for key, value in session.fingerprints.items():
                run.set_tag(key, value)
            run.set_tag("model_dir", str(session.model_dir))
            run.log_metrics(data_metrics(session.data))
            if calibration is not None:
                run.log_json(calibration, CALIBRATION_SUMMARY)
                run.set_tag("calibration_run", spec.calibration.run_id)
            outcome = _run_tasks_and_log(session, run, reporter)
            outcome.calibration = calibration
            return outcome


def data_metrics(data) -> dict[str, float]:
    """What the data stage cost: data_seconds, data_tokens (tokenized now; 0 when every set
    came from the cache), data_tokens_per_s, and the tokens of the job's sets."""
    out = {"data_seconds": data.seconds, "data_tokens": float(data.tokens_written),
           "data_set_tokens": float(data.tokens)}
    if data.tokens_written and data.seconds > 0:
        out["data_tokens_per_s"] = data.tokens_written / data.seconds
    return out


def _cells_of(task) -> int:
    if isinstance(task, UnlearnTask):
        return len(task.evaluate) * len(task.schedule)
    if isinstance(task, LdoTask):
        return len(task.evaluate) if task.left_out is not None else 0
    if isinstance(task, EkfacTask):
        return len(task.train) * len(task.test)
    return 0


def _run_tasks_and_log(session: JobSession, run: JobRun, reporter: Reporter) -> JobOutcome:
    """The job's tasks, durably (restored ones skipped), then its tables, scores and figures."""
    spec, data = session.spec, session.data
    train, test = data.train, data.test
    plans = plan_methods(spec, train, test, session.checkpoints, session.n_rows)
    enabled = spec.methods.enabled()
    base_sets = ([*test] if "untrac" in enabled else []) + (
        [*train] if "untrac_inv" in enabled else [])
    base_tasks = [EvalTask((n,), per_row=n in train) for n in base_sets]
    tasks = [t for plan in plans for t in plan.tasks]
    owner = [plan for plan in plans for _ in plan.tasks]  # task index -> its plan

    store = session.task_store(run)
    restored = store.restore([*base_tasks, *tasks])
    if run.resumed:
        reporter.stage(f"restored {len(restored)} of {len(base_tasks) + len(tasks)} tasks")
        run.set_tag("restored_tasks", str(len(restored)))
    restored_base = {i: r for i, r in restored.items() if i < len(base_tasks)}
    restored_tasks = {i - len(base_tasks): r for i, r in restored.items()
                      if i >= len(base_tasks)}
    left = len(base_tasks) + len(tasks) - len(restored)
    warned: list[str] = []

    def stored(result: TaskResult, error: str | None = None) -> None:
        """One line when the store stops taking results (the job goes on; they are kept)."""
        error = error or store.upload_error
        if error and not warned:
            warned.append(error)
            reporter.stage(f"warning: the tracking store did not take a finished task "
                           f"({error}); results are kept in {store.spool} and stored when "
                           "the job ends or resumes")

    def log_live(result: TaskResult, cells: list[dict]) -> None:
        """A finished trajectory's cells as metrics now (browsable while the job runs); a
        store that refuses them does not stop the job (the final table holds them too)."""
        try:
            run.log_cells(cells)
        except RunAdopted:  # another driver writes the run now: this one stops
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the store
            stored(result, str(err).strip().splitlines()[0] if str(err).strip() else
                   type(err).__name__)

    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(session.engine(
            max(len(tasks), len(base_tasks)))) if left else None
        if engine is not None:
            run.set_tag("actors", str(engine.size))
        base_losses: dict[str, float] = {}
        base_rows: dict = {}

        def base_done(result: TaskResult, was_restored: bool) -> None:
            base_losses.update(result.losses[0])
            base_rows.update(result.row_losses or {})
            stored(result)

        if base_tasks:
            todo = len(base_tasks) - len(restored_base)
            if todo:
                reporter.stage(f"base losses of {todo} sets on {_pool(engine)}")
            run_tasks(session, store, base_tasks, base_done, reporter.task_retried, engine,
                      restored=restored_base)
            if todo:
                run.log_base_losses(base_losses)

        results: dict[int, list[TaskResult]] = {id(p): [] for p in plans}
        live: list[dict] = []  # the cells of unlearning tasks, as each finishes
        seconds: dict[str, float] = {}

        def collect(result: TaskResult, was_restored: bool) -> None:
            plan = owner[result.index]
            results[id(plan)].append(result)
            label = "+".join(plan.methods)
            seconds[label] = seconds.get(label, 0.0) + result.seconds
            if isinstance(result.task, UnlearnTask):  # cells known at once: log now
                cells = influence_rows(result, base_losses)
                live.extend(cells)
                if not was_restored:  # a restored task's cells were logged when it ran
                    log_live(result, cells)
            if not was_restored:
                stored(result)
                reporter.task_done(result, _cells_of(result.task))

        todo = [t for i, t in enumerate(tasks) if i not in restored_tasks]
        if todo:
            reporter.stage(f"{', '.join(enabled)}: {len(todo)} tasks on {_pool(engine)}")
            reporter.work_started(len(todo), sum(_cells_of(t) for t in todo))
        try:
            run_tasks(session, store, tasks, collect, reporter.task_retried, engine,
                      restored=restored_tasks)
        except BaseException as stop:
            if live and not isinstance(stop, RunAdopted):  # keep what finished, beside the
                try:  # FAILED or KILLED status; a store failing now must not replace the
                    run.log_table(influence_table(average_members(live), train, test),
                                  "influence_partial")  # interrupt (KILLED, not FAILED)
                except Exception as err:  # noqa: BLE001 - any failure of the store
                    why = (str(err).strip() or type(err).__name__).splitlines()[0]
                    reporter.stage(f"warning: the partial table was not stored ({why}); "
                                   "`run --resume` recomputes it from the finished tasks")
            raise

    if store.flush():
        raise StoreLost(f"{len(store.pending())} finished tasks could not be stored in the "
                            f"MLflow run ({store.upload_error}); they are kept in "
                            f"{store.spool}: `untrac-ray run --resume` stores them")
    rows: list[dict] = []
    for plan in plans:
        ordered = sorted(results[id(plan)], key=lambda r: r.index)  # restored or not
        cells = plan.assemble(ordered, base_losses)
        if not all(isinstance(t, UnlearnTask) and t.settings.ensemble == 1 for t in plan.tasks):
            run.log_cells(cells)  # not logged live (an ensemble: its members were)
        rows.extend(cells)
    table = influence_table(rows, train, test)
    outcome = JobOutcome(run.run_id, session.uri, table, base_losses, session.model_dir,
                         seconds)
    if run.resumed:
        outcome.restored = (len(restored), len(base_tasks) + len(tasks))
    run.log_table(table, "influence")
    run.log_json(base_losses, "base_losses.json")
    run.log_metrics({metric_key("compute_seconds", m): v for m, v in seconds.items()})
    for plan in plans:
        outcome.extras.update(plan.extras)
    if "ldo_seeds" in outcome.extras:
        run.log_table(pd.DataFrame(outcome.extras["ldo_seeds"]), "ldo_seeds")
    if "untrac_inv" in enabled and spec.evaluation.top_examples:
        outcome.examples = drill_down(spec, data, results, plans, base_rows, session.indices)
        run.log_table(outcome.examples, "examples/top_examples")
    headline = {m: p for plan in plans for m, p in plan.headline.items()}
    outcome.agreement = agreement(table, headline)
    for method, members in outcome.extras.pop("members", {}).items():
        outcome.agreement[f"{method}_seeds"] = ensemble_agreement(members, method,
                                                                  headline[method])
    if outcome.agreement:  # the trust signal: estimates of the same cells that disagree
        run.log_metrics({metric_key("agreement", k): v for k, v in outcome.agreement.items()
                         if v == v})
        run.set_tag("agreement", ",".join(f"{k}={v:.3f}" for k, v in outcome.agreement.items()))
    truth = session.truth
    if truth is None and "ldo" in enabled:
        truth = truth_matrix(table)
    own_seeds = (pd.DataFrame(outcome.extras["ldo_seeds"])
                 if session.truth is None and "ldo_seeds" in outcome.extras else None)
    score(spec, run, outcome, truth, own_seeds, headline, train, test)
    log_figures(run, table, truth, outcome.scores, train, test)
    return outcome


def score(spec: JobSpec, run: JobRun, outcome: JobOutcome, truth: pd.DataFrame | None,
          ldo_seeds: pd.DataFrame | None, headline: dict[str, int], train: list[str],
          test: list[str]) -> None:
    """Every estimate against the ground truths the job has (leave-dataset-out's `truth`,
    the LDS's retrained subsets) in the one score table (results/scores.py), logged once, in
    outcome.scores. `ldo_seeds`: this run's own LDO per seed (plan_ldo's extras), for the
    Pearson's ceiling."""
    subsets = None
    if "lds_subsets" in outcome.extras:
        subsets = pd.DataFrame(outcome.extras["lds_subsets"])
        run.log_table(subsets, "lds_subsets")
    if truth is None and subsets is None:
        return
    if ldo_seeds is not None:
        ldo_seeds = ldo_seeds.assign(influence=ldo_seeds["loss_without"] - ldo_seeds["loss_full"])
    lds = spec.methods.lds
    found = score_frame(
        outcome.table, train, test, headline, spec.data.test_groups(), truth, ldo_seeds,
        subsets, resamples=lds.bootstrap if lds is not None else 1000,
        seed=lds.sample_seed if lds is not None else 0)
    if not found.empty:
        outcome.scores = found
        run.log_score_table(found)


def _pool(engine) -> str:
    """The pool in words: "2 actors", or "2 gangs of 4 actors" (actors_per_task)."""
    n = engine.resources.actors_per_task
    return f"{engine.size} actors" if n == 1 else f"{engine.size} gangs of {n} actors"


def drill_down(spec, data, results, plans, base_rows, indices) -> pd.DataFrame:
    """Top training rows per (training set, test set) by loss change under UnTrac-Inv."""
    after = {  # an ensemble's first member keeps per-row losses
        r.task.forget: r.row_losses
        for plan in plans if plan.methods == ["untrac_inv"] for r in results[id(plan)]
        if r.row_losses is not None
    }

    def decode(name: str, row: int) -> str:
        ids = data.tokenized(name).row_ids(row).tolist()
        return data.tokenizer.decode(ids, skip_special_tokens=True)

    return top_examples(base_rows, after, indices, decode, spec.evaluation.top_examples)


def log_figures(run: JobRun, table: pd.DataFrame, truth: pd.DataFrame | None,
                scores: pd.DataFrame | None, train: list[str], test: list[str]) -> None:
    """Heatmaps of every method, trajectories of the unlearning methods, and scatters of each
    estimate against the ground truth at its headline point (fixed in advance)."""
    for method in dict.fromkeys(table["method"]):
        run.log_figure(plots.heatmap(table, method, train, test), f"figures/heatmap_{method}.png")
        if method in UNLEARNING_METHODS:
            run.log_figure(plots.trajectory(table, method, train, test),
                           f"figures/trajectory_{method}.png")
    if truth is None or scores is None:
        return
    top = headline_rows(scores)
    top = top[(top["kind"] == ESTIMATE)].drop_duplicates("method")
    for _, row in top.iterrows():
        est = matrix(table, row["method"], int(row["point"]), train, test)
        fig = plots.scatter_vs_truth(est, truth.reindex(index=train, columns=test),
                                     row["method"])
        run.log_figure(fig, f"figures/scatter_{row['method']}.png")
