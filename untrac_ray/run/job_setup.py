"""The pieces of a job's set-up, shared by `run` and `tune` through session.py: tokenized
data, the base model (a folder, or trained once for the spec), the weight sets tasks start
from, the evaluation sample and a ground truth read from an earlier run. Also `Reporter`,
what a job tells its caller as it goes. Nothing here starts Ray or writes to MLflow; the data
are tokenized with Ray Data when Ray is up (engine/data_stage.py).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import ray
from transformers import PreTrainedTokenizerBase

from untrac_ray.compute.evaluation import sample_indices
from untrac_ray.compute.modeling import SharedWeights, load_model
from untrac_ray.compute.training import (
    find_trained_model,
    initial_model,
    read_train_record,
    train_base_model,
)
from untrac_ray.engine.data_stage import tokenize_on_cluster
from untrac_ray.inputs.errors import InputError, ModelError
from untrac_ray.inputs.hub import model_folder
from untrac_ray.inputs.model_folder import check_model_folder
from untrac_ray.inputs.preflight import check_job
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import GROUND_TRUTH, GROUND_TRUTHS
from untrac_ray.inputs.token_store import StoredSet, find_cached, set_folder, tokenized_dataset
from untrac_ray.inputs.tokenization import TokenizedSet, load_tokenizer
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

    def data_progress(self, name: str, rows_done: int, rows_total: int | None, tokens: int,
                      finished: bool = False) -> None:
        """A dataset being tokenized reached `rows_done` source rows of `rows_total` (None:
        not known in advance) and `tokens` tokens; `finished` on its last call."""

    def work_started(self, tasks: int, cells: int) -> None:
        """The methods' tasks were submitted; they will yield about `cells` influence cells."""

    def task_done(self, result: TaskResult, cells: int) -> None:
        """A task finished, completing `cells` cells."""

    def task_retried(self, task: Any, reason: str) -> None:
        """A task's actor died (a crash, a lost node); the task runs again on another."""


@dataclass
class PreparedData:
    """Tokenized datasets of a job, by name (in the on-disk cache), and the tokenizer that made
    them; `seconds` and `tokens_written` (tokens written now, 0 when all came from the cache) say
    what the data stage cost."""

    tokenizer: PreTrainedTokenizerBase
    sets: dict[str, StoredSet]
    train: list[str]
    test: list[str]
    seconds: float = 0.0
    tokens_written: int = 0
    _open: dict[str, TokenizedSet] = field(default_factory=dict, repr=False)

    @property
    def n_rows(self) -> dict[str, int]:
        return {name: s.rows for name, s in self.sets.items()}

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sets.values())

    def tokenized(self, name: str) -> TokenizedSet:
        """A set's torch-side view, memory-mapped from the cache (opened once)."""
        if name not in self._open:
            self._open[name] = self.sets[name].open(self.tokenizer.pad_token_id)
        return self._open[name]


def prepare_data(spec: JobSpec, tokenizer: PreTrainedTokenizerBase | None = None,
                 reporter: Reporter | None = None, checked: bool = False) -> PreparedData:
    """Tokenize every dataset once into the cache under cache_dir (or reuse it): with Ray
    Data on the cluster's CPUs when Ray is up (engine/data_stage.py), else in this process.
    `checked`: the caller ran check_job already."""
    if not checked:
        check_job(spec, survey=False)  # bad data, model or cache_dir: one line, before work
    reporter = reporter or Reporter()
    tok = tokenizer or load_tokenizer(spec.tokenizer, model_folder(spec.model))
    started, written = time.monotonic(), 0
    sets: dict[str, StoredSet] = {}
    for ds in [*spec.data.train, *spec.data.test]:
        def progress(rows: int, total: int | None, tokens: int, name: str = ds.name) -> None:
            reporter.data_progress(name, rows, total, tokens)

        folder = set_folder(ds, tok, spec.tokenizer, spec.cache_dir)
        found = find_cached(ds.name, folder)
        if found is not None:
            sets[ds.name] = found
            continue
        reporter.data_progress(ds.name, 0, None, 0)  # the set begins
        if ray.is_initialized():
            stored = tokenize_on_cluster(ds, tok, spec.tokenizer, spec.cache_dir, progress)
        else:
            stored = tokenized_dataset(ds, tok, spec.tokenizer, spec.cache_dir,
                                       lambda r, t, p=progress: p(r, None, t))
        reporter.data_progress(ds.name, stored.source_rows, stored.source_rows, stored.tokens,
                               finished=True)
        sets[ds.name] = stored
        written += stored.tokens
    return PreparedData(tok, sets, [d.name for d in spec.data.train],
                        [d.name for d in spec.data.test], time.monotonic() - started, written)


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
    return {n: sample_indices(rows, ev.max_examples, ev.seed) for n, rows in data.n_rows.items()}


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
