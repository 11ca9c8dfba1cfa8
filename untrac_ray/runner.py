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
from untrac_ray.errors import ModelError
from untrac_ray.evaluation import sample_indices
from untrac_ray.modeling import SharedWeights, check_model_folder, load_model
from untrac_ray.results import influence_rows, influence_table
from untrac_ray.spec import JobSpec
from untrac_ray.tokenization import TokenizedSet, load_tokenizer, tokenized_dataset
from untrac_ray.tracking import JobRun, resolve_tracking_uri
from untrac_ray.training import find_trained_model, train_base_model
from untrac_ray.workbench import EvalTask, TaskResult, UnlearnTask


class Reporter:
    """What a job tells its caller as it goes; the CLI subclasses it to draw progress."""

    def stage(self, message: str) -> None:
        """A new phase began."""

    def training_step(self, step: int, total: int, loss: float) -> None:
        """The base model took a training step."""

    def cells_started(self, total: int) -> None:
        """Unlearning began; `total` influence cells (all methods and steps) will come."""

    def cells_done(self, count: int, result: TaskResult) -> None:
        """A task finished with `count` cells."""


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


def prepare_data(spec: JobSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """Load and tokenize every dataset once (cached as Arrow files under cache_dir)."""
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

    A model given as a config is trained on the job's training sets once, then reused for
    the same model, tokenizer, training settings and data (keyed by their hash).
    """
    reporter = reporter or Reporter()
    if spec.model.path is not None:
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


def plan_tasks(spec: JobSpec, data: PreparedData) -> list[UnlearnTask]:
    """One task per training set for UnTrac, one per test set for UnTrac-Inv."""
    tasks = []
    for method, settings in spec.methods.enabled().items():
        forget, evaluate = (
            (data.train, data.test) if method == "untrac" else (data.test, data.train)
        )
        tasks += [UnlearnTask(method, name, tuple(evaluate), settings) for name in forget]
    return tasks


def evaluated_sets(tasks: list[UnlearnTask]) -> list[str]:
    """Every dataset some task evaluates, in first-seen order."""
    return list(dict.fromkeys(name for t in tasks for name in t.evaluate))


def count_cells(task: UnlearnTask, data: PreparedData) -> int:
    n_rows = data.tables[task.forget].num_rows
    return len(task.evaluate) * len(task.settings.resolved_eval_steps(n_rows))


def eval_sample(spec: JobSpec, data: PreparedData, names: list[str]) -> dict[str, np.ndarray]:
    """The rows evaluated per dataset (a seeded sample of evaluation.max_examples)."""
    ev = spec.evaluation
    return {n: sample_indices(data.tables[n].num_rows, ev.max_examples, ev.seed) for n in names}


def load_shared_weights(model_dir: Path, data: PreparedData) -> SharedWeights:
    model = load_model(str(model_dir))
    if model.config.vocab_size < len(data.tokenizer):
        raise ModelError(
            f"model in {model_dir} has {model.config.vocab_size} token embeddings but the "
            f"tokenizer has {len(data.tokenizer)} tokens; use the model's own tokenizer"
        )
    return SharedWeights.from_model(model)


def run_job(
    spec: JobSpec,
    tracking_uri: str | None = None,
    address: str | None = None,
    reporter: Reporter | None = None,
    tags: dict[str, str] | None = None,
) -> JobOutcome:
    """Run a whole job and log it as one MLflow run; returns the tidy influence table.

    Everything that can fail on bad input (data, model folder, spec) fails before the MLflow
    run is created. A failure afterwards marks the run FAILED, keeping the cells logged so far.
    """
    reporter = reporter or Reporter()
    uri = resolve_tracking_uri(tracking_uri, spec)
    reporter.stage("loading and tokenizing datasets")
    data = prepare_data(spec)
    model_dir = resolve_model(spec, data, reporter)
    weights = load_shared_weights(model_dir, data)
    tasks = plan_tasks(spec, data)
    to_evaluate = evaluated_sets(tasks)
    indices = eval_sample(spec, data, to_evaluate)

    started_ray = ensure_ray(spec.resources, address)
    try:
        with JobRun(spec, uri, tags) as run:
            run.set_tag("model_dir", str(model_dir))
            with Engine(
                spec.resources, weights, data.tables, data.tokenizer.pad_token_id, indices,
                spec.evaluation.batch_size, max_useful_actors=max(len(tasks), len(to_evaluate)),
            ) as engine:
                run.set_tag("actors", str(engine.size))
                reporter.stage(f"base losses of {len(to_evaluate)} sets on {engine.size} actors")
                base_losses: dict[str, float] = {}
                for result in engine.map([EvalTask((name,)) for name in to_evaluate]):
                    base_losses.update(result.losses[0])
                run.log_base_losses(base_losses)

                rows: list[dict] = []
                seconds: dict[str, float] = {}

                def collect(result: TaskResult) -> None:
                    cells = influence_rows(result, base_losses)
                    rows.extend(cells)
                    run.log_cells(cells)
                    method = result.task.method
                    seconds[method] = seconds.get(method, 0.0) + result.seconds
                    reporter.cells_done(len(cells), result)

                reporter.stage(f"unlearning: {len(tasks)} tasks")
                reporter.cells_started(sum(count_cells(t, data) for t in tasks))
                try:
                    engine.map(tasks, collect)
                except BaseException:
                    if rows:  # keep what finished, beside the FAILED status
                        run.log_table(influence_table(rows, data.train, data.test),
                                      "influence_partial")
                    raise

            table = influence_table(rows, data.train, data.test)
            run.log_table(table, "influence")
            run.log_json(base_losses, "base_losses.json")
            run.log_metrics({f"task_seconds/{m}": s for m, s in seconds.items()})
            for method in spec.methods.enabled():
                run.log_figure(plots.heatmap(table, method, data.train, data.test),
                               f"figures/heatmap_{method}.png")
                run.log_figure(plots.trajectory(table, method, data.train, data.test),
                               f"figures/trajectory_{method}.png")
            return JobOutcome(run.run_id, uri, table, base_losses, model_dir, seconds)
    finally:
        if started_ray:
            ray.shutdown()
