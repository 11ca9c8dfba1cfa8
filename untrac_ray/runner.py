"""A job from start to end: data, base model, tasks on the engine, results into MLflow.

The CLI (local `run`, and a job submitted to a cluster) calls `run_job`; nothing here parses
arguments or prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from transformers import PreTrainedTokenizerBase

from untrac_ray import plots
from untrac_ray.engine import Engine, ensure_ray
from untrac_ray.errors import ModelError, UntracError
from untrac_ray.evaluation import sample_indices
from untrac_ray.methods import plan_methods
from untrac_ray.modeling import SharedWeights, check_model_folder, load_model
from untrac_ray.preflight import check_job
from untrac_ray.results import influence_rows, influence_table, matrix, top_examples
from untrac_ray.scoring import check_truth_matches, score_table, summary, truth_matrix
from untrac_ray.spec import GROUND_TRUTH, UNLEARNING_METHODS, JobSpec
from untrac_ray.tasks import BASE, EkfacTask, EvalTask, LdoTask, UnlearnTask, init_weights_name
from untrac_ray.tokenization import TokenizedSet, load_tokenizer, tokenized_dataset
from untrac_ray.tracking import (
    JobRun,
    check_store,
    metric_key,
    read_influence,
    resolve_tracking_uri,
)
from untrac_ray.training import (
    find_trained_model,
    initial_model,
    read_train_record,
    train_base_model,
)
from untrac_ray.workbench import TaskResult


class Reporter:
    """What a job tells its caller as it goes; the CLI subclasses it to draw progress."""

    def stage(self, message: str) -> None:
        """A new phase began."""

    def training_step(self, step: int, total: int, loss: float) -> None:
        """A model being trained on the driver took a step."""

    def work_started(self, tasks: int, cells: int) -> None:
        """The methods' tasks were submitted; they will yield about `cells` influence cells."""

    def task_done(self, result: TaskResult, cells: int) -> None:
        """A task finished, completing `cells` cells."""


@dataclass
class PreparedData:
    """Tokenized datasets of a job, by name, and the tokenizer that made them."""

    tokenizer: PreTrainedTokenizerBase
    tables: dict[str, pa.Table]
    train: list[str]
    test: list[str]

    def tokenized(self, name: str) -> TokenizedSet:
        return TokenizedSet.from_table(name, self.tables[name], self.tokenizer.pad_token_id)


@dataclass
class JobOutcome:
    """What a finished job produced."""

    run_id: str
    tracking_uri: str
    table: pd.DataFrame
    base_losses: dict[str, float]
    model_dir: Path
    seconds_by_method: dict[str, float] = field(default_factory=dict)
    scores: pd.DataFrame | None = None
    score_summary: pd.DataFrame | None = None
    examples: pd.DataFrame | None = None
    extras: dict = field(default_factory=dict)


def prepare_data(spec: JobSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """Load and tokenize every dataset once (cached as Arrow files under cache_dir)."""
    check_job(spec, read_rows=False)  # bad data, model or cache_dir: one line, before work
    tok = tokenizer or load_tokenizer(spec.tokenizer, spec.model.path)
    tables = {
        ds.name: tokenized_dataset(ds, tok, spec.tokenizer, spec.cache_dir)
        for ds in [*spec.data.train, *spec.data.test]
    }
    return PreparedData(
        tok, tables, [d.name for d in spec.data.train], [d.name for d in spec.data.test]
    )


def resolve_model(spec: JobSpec, data: PreparedData, reporter: Reporter | None = None) -> Path:
    """The model folder to study: the spec's folder, or the model trained for this spec.

    A model given as a config, or a folder with `finetune: true`, is trained on the job's
    training sets once (from the config's initialisation, or further from the folder's
    weights), then reused for the same model, tokenizer, training settings and data (keyed
    by their hash, the folder's weights included).
    """
    reporter = reporter or Reporter()
    if spec.model.path is not None and not spec.model.finetune:
        check_model_folder(spec.model.path)
        return Path(spec.model.path)
    found = find_trained_model(spec)
    if found is not None:
        reporter.stage(f"reusing the base model trained earlier: {found}")
        return found
    reporter.stage("training the base model")
    return train_model_for(spec, data, reporter)


def train_model_for(spec: JobSpec, data: PreparedData, reporter: Reporter | None = None) -> Path:
    """Train (or continue training) the spec's model on its training sets and save it."""
    reporter = reporter or Reporter()
    sets = [data.tokenized(name) for name in data.train]
    return train_base_model(spec, data.tokenizer, sets, reporter.training_step)


def eval_sample(spec: JobSpec, data: PreparedData) -> dict[str, np.ndarray]:
    """The rows evaluated per dataset (a seeded sample of evaluation.max_examples)."""
    ev = spec.evaluation
    return {n: sample_indices(t.num_rows, ev.max_examples, ev.seed) for n, t in data.tables.items()}


def load_shared_weights(model_dir: Path, data: PreparedData) -> SharedWeights:
    model = load_model(str(model_dir))
    if model.config.vocab_size < len(data.tokenizer):
        raise ModelError(
            f"model in {model_dir} has {model.config.vocab_size} token embeddings but the "
            f"tokenizer has {len(data.tokenizer)} tokens; use the model's own tokenizer"
        )
    return SharedWeights.from_model(model)


def weight_sets(
    spec: JobSpec, data: PreparedData, model_dir: Path
) -> tuple[dict[str, SharedWeights], list[dict]]:
    """Every weight set the job's tasks start from: the base model, TracIn's checkpoints and
    the initial weights of leave-dataset-out retraining (one per seed), and the checkpoints."""
    weights = {BASE: load_shared_weights(model_dir, data)}
    checkpoints: list[dict] = []
    enabled = spec.methods.enabled()
    if "tracin" in enabled:
        checkpoints = read_train_record(model_dir).get("checkpoints", [])
        if not checkpoints:
            raise ModelError(f"methods.tracin: the model in {model_dir} has no checkpoints")
        for c in checkpoints:
            weights[f"ckpt/{c['step']}"] = load_shared_weights(Path(c["path"]), data)
    if "ldo" in enabled:
        seeds = spec.methods.ldo.seeds or [spec.training.seed]
        if spec.pretraining is not None or spec.model.config is None:
            # from a pretrained stage or a model folder, the start does not depend on the seed
            start = SharedWeights.from_model(initial_model(spec, data.tokenizer, seeds[0]))
            weights.update({init_weights_name(seed): start for seed in seeds})
        else:
            for seed in seeds:
                model = initial_model(spec, data.tokenizer, seed)
                weights[init_weights_name(seed)] = SharedWeights.from_model(model)
    return weights, checkpoints


def load_ground_truth(spec: JobSpec, uri: str, train: list[str], test: list[str]) -> pd.DataFrame:
    """The ldo matrix of the earlier run named in spec.ground_truth, checked against the job."""
    gt = spec.ground_truth
    origin = f"ground_truth.run_id {gt.run_id}"
    table = read_influence(gt.run_id, gt.tracking_uri or uri)
    if not (table["method"] == GROUND_TRUTH).any():
        raise UntracError(f"{origin}: that run has no leave-dataset-out (ldo) results")
    truth = truth_matrix(table)
    check_truth_matches(truth, train, test, origin)
    return truth


def _cells_of(task) -> int:
    if isinstance(task, UnlearnTask):
        return len(task.evaluate) * len(task.schedule)
    if isinstance(task, LdoTask):
        return len(task.evaluate) if task.left_out is not None else 0
    if isinstance(task, EkfacTask):
        return len(task.train) * len(task.test)
    return 0


def run_job(
    spec: JobSpec,
    tracking_uri: str | None = None,
    address: str | None = None,
    reporter: Reporter | None = None,
    tags: dict[str, str] | None = None,
) -> JobOutcome:
    """Run a whole job and log it as one MLflow run; returns the tidy influence table.

    Everything that can fail on bad input (data, model folder, spec, ground-truth run) fails
    before the MLflow run is created. A failure afterwards marks the run FAILED, keeping the
    cells logged so far.
    """
    reporter = reporter or Reporter()
    uri = resolve_tracking_uri(tracking_uri, spec)
    check_store(uri)  # seconds, before any data, training or Ray
    reporter.stage("loading and tokenizing datasets")
    data = prepare_data(spec)
    train, test = data.train, data.test
    truth = load_ground_truth(spec, uri, train, test) if spec.ground_truth else None
    model_dir = resolve_model(spec, data, reporter)
    weights, checkpoints = weight_sets(spec, data, model_dir)
    plans = plan_methods(spec, train, test, checkpoints,
                         {name: table.num_rows for name, table in data.tables.items()})
    enabled = spec.methods.enabled()
    base_sets = ([*test] if "untrac" in enabled else []) + (
        [*train] if "untrac_inv" in enabled else [])
    base_tasks = [EvalTask((n,), per_row=n in train) for n in base_sets]
    tasks = [t for plan in plans for t in plan.tasks]
    owner = [plan for plan in plans for _ in plan.tasks]  # task index -> its plan
    indices = eval_sample(spec, data)

    started_ray = ensure_ray(spec.resources, address)
    try:
        with JobRun(spec, uri, tags) as run:
            run.set_tag("model_dir", str(model_dir))
            with Engine(
                spec.resources, weights, data.tables, data.tokenizer.pad_token_id, indices,
                spec.evaluation.batch_size, max_useful_actors=max(len(tasks), len(base_tasks)),
            ) as engine:
                run.set_tag("actors", str(engine.size))
                base_losses: dict[str, float] = {}
                base_rows: dict[str, np.ndarray] = {}
                if base_tasks:
                    reporter.stage(f"base losses of {len(base_tasks)} sets on "
                                   f"{engine.size} actors")
                    for result in engine.map(base_tasks):
                        base_losses.update(result.losses[0])
                        base_rows.update(result.row_losses or {})
                    run.log_base_losses(base_losses)

                results: dict[int, list[TaskResult]] = {id(p): [] for p in plans}
                rows: list[dict] = []
                seconds: dict[str, float] = {}

                def collect(result: TaskResult) -> None:
                    plan = owner[result.index]
                    results[id(plan)].append(result)
                    label = "+".join(plan.methods)
                    seconds[label] = seconds.get(label, 0.0) + result.seconds
                    if isinstance(result.task, UnlearnTask):  # cells known at once: log now
                        cells = influence_rows(result, base_losses)
                        rows.extend(cells)
                        run.log_cells(cells)
                    reporter.task_done(result, _cells_of(result.task))

                reporter.stage(f"{', '.join(enabled)}: {len(tasks)} tasks on "
                               f"{engine.size} actors")
                reporter.work_started(len(tasks), sum(_cells_of(t) for t in tasks))
                try:
                    engine.map(tasks, collect)
                except BaseException:
                    if rows:  # keep what finished, beside the FAILED status
                        run.log_table(influence_table(rows, train, test), "influence_partial")
                    raise

            for plan in plans:
                if not isinstance(plan.tasks[0], UnlearnTask):
                    cells = plan.assemble(results[id(plan)], base_losses)
                    run.log_cells(cells)
                    rows.extend(cells)
            table = influence_table(rows, train, test)
            outcome = JobOutcome(run.run_id, uri, table, base_losses, model_dir, seconds)
            run.log_table(table, "influence")
            run.log_json(base_losses, "base_losses.json")
            run.log_metrics({metric_key("compute_seconds", m): v for m, v in seconds.items()})
            for plan in plans:
                outcome.extras.update(plan.extras)
            if "ldo_seeds" in outcome.extras:
                run.log_table(pd.DataFrame(outcome.extras["ldo_seeds"]), "ldo_seeds")
            if "untrac_inv" in enabled and spec.evaluation.top_examples:
                outcome.examples = drill_down(spec, data, results, plans, base_rows, indices)
                run.log_table(outcome.examples, "examples/top_examples")
            if truth is None and "ldo" in enabled:
                truth = truth_matrix(table)
            if truth is not None and spec.methods.estimates():
                outcome.scores = score_table(table, truth)
                headline = {m: p for plan in plans for m, p in plan.headline.items()}
                outcome.score_summary = summary(outcome.scores, headline)
                run.log_scores(outcome.scores, outcome.score_summary)
            log_figures(run, table, truth, outcome.score_summary, train, test)
            return outcome
    finally:
        if started_ray:
            ray.shutdown()


def drill_down(spec, data, results, plans, base_rows, indices) -> pd.DataFrame:
    """Top training rows per (training set, test set) by loss change under UnTrac-Inv."""
    after = {
        r.task.forget: r.row_losses
        for plan in plans if plan.methods == ["untrac_inv"] for r in results[id(plan)]
    }

    def decode(name: str, row: int) -> str:
        ids = data.tables[name].column("input_ids")[row].as_py()
        return data.tokenizer.decode(ids, skip_special_tokens=True)

    return top_examples(base_rows, after, indices, decode, spec.evaluation.top_examples)


def log_figures(run: JobRun, table: pd.DataFrame, truth: pd.DataFrame | None,
                score_summary: pd.DataFrame | None, train: list[str], test: list[str]) -> None:
    """Heatmaps of every method, trajectories of the unlearning methods, and scatters of each
    estimate against the ground truth at its headline point (fixed in advance)."""
    for method in dict.fromkeys(table["method"]):
        run.log_figure(plots.heatmap(table, method, train, test), f"figures/heatmap_{method}.png")
        if method in UNLEARNING_METHODS:
            run.log_figure(plots.trajectory(table, method, train, test),
                           f"figures/trajectory_{method}.png")
    if truth is None or score_summary is None:
        return
    for _, row in score_summary.iterrows():
        est = matrix(table, row["method"], int(row["point"]), train, test)
        fig = plots.scatter_vs_truth(est, truth.reindex(index=train, columns=test),
                                     row["method"])
        run.log_figure(fig, f"figures/scatter_{row['method']}.png")
