"""The pieces of a job's set-up, shared by `run` and `tune` through session.py: tokenized
data, the base model (a folder, or trained once for the spec), the weight sets tasks start
from, the evaluation sample and a ground truth read from an earlier run. Also `Reporter`,
what a job tells its caller as it goes. Nothing here starts Ray or writes to MLflow.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from untrac_ray.compute.evaluation import sample_indices
from untrac_ray.compute.modeling import SharedWeights, load_model
from untrac_ray.compute.training import (
    find_trained_model,
    initial_model,
    read_train_record,
    train_base_model,
)
from untrac_ray.inputs.errors import InputError, ModelError
from untrac_ray.inputs.hub import model_folder
from untrac_ray.inputs.model_folder import check_model_folder
from untrac_ray.inputs.preflight import check_job
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import GROUND_TRUTH, GROUND_TRUTHS
from untrac_ray.inputs.tokenization import TokenizedSet, load_tokenizer, tokenized_dataset
from untrac_ray.methods.tasks import BASE, init_weights_name
from untrac_ray.results.runs import read_influence
from untrac_ray.results.scoring import check_truth_matches, truth_matrix

if TYPE_CHECKING:
    from untrac_ray.methods.tasks import TaskResult


class Reporter:
    """What a job tells its caller as it goes; the CLI subclasses it to draw progress."""

    def stage(self, message: str) -> None:
        """A new phase began."""

    def training_step(self, step: int, total: int, loss: float, tokens: int = 0) -> None:
        """A model being trained on the driver took a step (of `tokens` labelled tokens)."""

    def work_started(self, tasks: int, cells: int) -> None:
        """The methods' tasks were submitted; they will yield about `cells` influence cells."""

    def task_done(self, result: TaskResult, cells: int) -> None:
        """A task finished, completing `cells` cells."""

    def task_retried(self, task: Any, reason: str) -> None:
        """A task's actor died (a crash, a lost node); the task runs again on another."""


@dataclass
class PreparedData:
    """Tokenized datasets of a job, by name, and the tokenizer that made them."""

    tokenizer: PreTrainedTokenizerBase
    tables: dict[str, pa.Table]
    train: list[str]
    test: list[str]

    def tokenized(self, name: str) -> TokenizedSet:
        return TokenizedSet.from_table(name, self.tables[name], self.tokenizer.pad_token_id)


def prepare_data(spec: JobSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """Load and tokenize every dataset once (cached as Arrow files under cache_dir)."""
    check_job(spec, survey=False)  # bad data, model or cache_dir: one line, before work
    tok = tokenizer or load_tokenizer(spec.tokenizer, model_folder(spec.model))
    tables = {
        ds.name: tokenized_dataset(ds, tok, spec.tokenizer, spec.cache_dir)
        for ds in [*spec.data.train, *spec.data.test]
    }
    return PreparedData(
        tok, tables, [d.name for d in spec.data.train], [d.name for d in spec.data.test]
    )


def resolve_model(spec: JobSpec, data: PreparedData, reporter: Reporter | None = None) -> Path:
    """The model folder to study: the spec's folder (a Hub id's snapshot folder at the
    commit the job pinned, inputs/hub.py), or the model trained for this spec.

    A model given as a config, or a folder with `finetune: true`, is trained on the job's
    training sets once (from the config's initialisation, or further from the folder's
    weights), then reused for the same model, tokenizer, training settings and data (keyed
    by their hash, the folder's weights included).
    """
    reporter = reporter or Reporter()
    if spec.model.path is not None and not spec.model.finetune:
        folder = model_folder(spec.model)
        check_model_folder(folder)
        return Path(folder)
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
    spec: JobSpec, data: PreparedData, model_dir: Path, methods: Collection[str] | None = None,
) -> tuple[dict[str, SharedWeights], list[dict]]:
    """Every weight set the tasks of `methods` (default: the spec's) start from: the base
    model, TracIn's checkpoints and the initial weights of retraining (leave-dataset-out and
    LDS: one per seed), and the checkpoints."""
    weights = {BASE: load_shared_weights(model_dir, data)}
    checkpoints: list[dict] = []
    enabled = spec.methods.enabled() if methods is None else methods
    if "tracin" in enabled:
        checkpoints = read_train_record(model_dir).get("checkpoints", [])
        if not checkpoints:
            raise ModelError(f"methods.tracin: the model in {model_dir} has no checkpoints")
        for c in checkpoints:
            weights[f"ckpt/{c['step']}"] = load_shared_weights(Path(c["path"]), data)
    if set(GROUND_TRUTHS) & set(enabled):
        seeds = spec.methods.retraining_seeds(spec.training.seed)
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
        raise InputError(f"{origin}: that run has no leave-dataset-out (ldo) results")
    truth = truth_matrix(table)
    check_truth_matches(truth, train, test, origin)
    return truth
