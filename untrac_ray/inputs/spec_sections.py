"""The job spec's common ground and its plain sections: the strict base every section is
made of, the names of the methods, and the model, tokenizer, data, training, evaluation,
resources, tracking and ground-truth sections. The methods' settings are in spec_methods.py,
a search's in spec_search.py, the whole job in spec.py.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from untrac_ray.inputs.hub import DEFAULT_REVISION, looks_like_hub_id
from untrac_ray.inputs.redaction import redact

Optimizer = Literal["adam", "sgd", "adafactor"]
METHODS: tuple[str, ...] = ("untrac", "untrac_inv", "ldo", "lds", "graddot", "gradcos", "tracin",
                           "ekfac")
UNLEARNING_METHODS = ("untrac", "untrac_inv")
GROUND_TRUTH = "ldo"
GROUND_TRUTHS = ("ldo", "lds")  # retraining: leave-dataset-out, random subsets (LDS)
CELL_METHODS = tuple(m for m in METHODS if m != "lds")  # those with cells in the table
# Between the names of an LDS subset's training sets, where a subset is stored as one string;
# a dataset's name cannot hold it (DatasetSpec._plain_name).
KEPT_SEPARATOR = "/"
# With resources.actors_per_task > 1 (a gang, engine/sharded.py): the methods a sharded bench cannot
# run, and the unlearning optimizers it can (elementwise updates work on shards; training.
# optimizer, LDO's, is always one of them).
SHARDED_REFUSED = ("graddot", "gradcos", "tracin", "ekfac")
SHARDED_UNLEARNING = ("adam", "sgd")
KRONFLUENCE_INSTALL = (
    "pip install 'untrac-ray[ekfac]' && pip install --no-deps kronfluence==1.0.1"
)
DATA_FORMATS = ("csv", "jsonl", "parquet", "hf_disk")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    def __repr__(self) -> str:  # a spec in a traceback or a log shows no credential
        return redact(super().__repr__())

    def __str__(self) -> str:
        return redact(super().__str__())


def is_uri(path: str) -> bool:
    """True for remote sources such as s3://bucket/key (opened through pyarrow's filesystems)."""
    return "://" in path


class TokenizerSpec(StrictModel):
    """Which tokenizer to use. Left out, a model folder's own (model.path: the tokenizer it was
    trained with), else a byte-level one built in code (no download). `pretrained` reads a
    local folder: `path`, by default the model's folder (JobSpec fills it in)."""

    kind: Literal["byte", "pretrained"] | None = Field(
        None, description="default: pretrained, from model.path's folder; byte for a model "
        "built from model.config")
    path: str | None = Field(None, description="a local tokenizer folder (default: model.path)")
    max_length: int = Field(128, gt=1, description="longest prompt+target row, in tokens")
    block_size: int = Field(128, gt=1, description="length of packed blocks for text rows")


class TrainingSpec(StrictModel):
    """How the base model is trained on the job's training datasets (`untrac-ray train`)."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    checkpoints: list[int] | None = Field(None, description="steps whose weights are kept")
    checkpoint_every: int | None = Field(None, gt=0)
    output_dir: str | None = Field(
        None, description="where to save the model; default: the cache, keyed by spec hash"
    )

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps of a training over n_rows rows: max_steps, else epochs over them."""
        return self.max_steps or self.epochs * math.ceil(n_rows / self.batch_size)

    def checkpoint_steps(self, total_steps: int) -> list[int]:
        """Steps at which `train` keeps a checkpoint (for TracIn), within the run."""
        steps = set(s for s in (self.checkpoints or []) if 0 < s <= total_steps)
        if self.checkpoint_every:
            steps.update(range(self.checkpoint_every, total_steps + 1, self.checkpoint_every))
        return sorted(steps)


class ModelSpec(StrictModel):
    """The model under study: a local Hugging Face folder or a Hub id (inputs/hub.py), or a
    config to train from scratch."""

    path: str | None = Field(None, description="a local model folder, or a Hugging Face Hub "
                             "id (org/name) resolved through the Hugging Face cache")
    revision: str = Field(DEFAULT_REVISION, min_length=1, description="with a Hub id in "
                          "path: the branch, tag or commit to use (the job pins its commit)")
    config: dict[str, Any] | None = None
    finetune: bool = Field(
        False, description="fine-tune the model at `path` on the training sets before study"
    )
    # (path, revision, commit, snapshot folder) once hub.model_commit / model_folder resolved
    # a Hub id: the job's one resolution, never dumped (see inputs/hub.py)
    _hub: tuple | None = PrivateAttr(None)

    @property
    def trained_by_job(self) -> bool:
        """True when the studied model is trained by untrac-ray (so it can be retrained: LDO)."""
        return self.config is not None or self.finetune

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of 'path' (a local model folder or a Hub id) "
                             "or 'config'")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config needs a 'model_type' (for example gpt2)")
        if self.revision != DEFAULT_REVISION and not looks_like_hub_id(self.path):
            raise ValueError("revision: only for a model named by a Hub id in model.path "
                             "(org/name)")
        return self


class DatasetSpec(StrictModel):
    """One named dataset: where its rows come from and what kind of rows they are."""

    name: str = Field(min_length=1)
    source: str = Field(min_length=1, description="a file, a folder of shards or a glob "
                        "(local or a URI): Parquet, CSV, JSON Lines (.gz/.zst too), or a "
                        "datasets save_to_disk folder")
    format: Literal["csv", "jsonl", "parquet", "hf_disk"] | None = None
    kind: Literal["text", "prompt_target"] = "prompt_target"
    subset: str | None = Field(None, description="keep rows whose subset_column equals this")
    max_rows: int | None = Field(
        None, gt=0, description="keep the first max_rows rows (after subset), e.g. to cut a "
        "set to a size"
    )
    sample_rows: int | None = Field(
        None, gt=0, description="keep a seeded sample of this many rows drawn uniformly from "
        "the whole set (every shard; after subset); the set is the sample for every method")
    sample_seed: int = Field(0, description="the seed of sample_rows' draw")
    group: str | None = Field(
        None, description="test sets only: the test set this one is a subset of; scores "
        "average the Pearsons of a test set's subsets first, then the test sets (the paper's "
        "ToxiGen groups, WinoBias and TruthfulQA categories)")
    subset_column: str = "dataset"
    text_column: str = "text"
    prompt_column: str = "prompt"
    target_column: str = "target"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if name != name.strip() or KEPT_SEPARATOR in name:
            raise ValueError(f"name {name!r} must not contain {KEPT_SEPARATOR!r} or "
                             "surrounding spaces")
        return name

    @model_validator(mode="after")
    def _one_cut(self) -> DatasetSpec:
        if self.max_rows is not None and self.sample_rows is not None:
            raise ValueError("give max_rows (the first rows) or sample_rows (a seeded sample "
                             "of the whole set), not both")
        return self


class DataSpec(StrictModel):
    train: list[DatasetSpec] = Field(min_length=1)
    test: list[DatasetSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> DataSpec:
        for role in ("train", "test"):
            seen: set[str] = set()
            for ds in getattr(self, role):
                if ds.name in seen:
                    raise ValueError(f"{role} dataset name {ds.name!r} is used twice")
                seen.add(ds.name)
        if any(ds.group is not None for ds in self.train):
            raise ValueError("group: only test sets are grouped (into the test set they are "
                             "subsets of)")
        both = {d.name for d in self.train} & {d.name for d in self.test}
        if both:
            raise ValueError(
                f"dataset name {sorted(both)[0]!r} is used in both train and test; "
                "give each dataset its own name"
            )
        return self

    def test_groups(self) -> dict[str, str]:
        """Test set -> the test set it is a subset of (only those with a group)."""
        return {ds.name: ds.group for ds in self.test if ds.group is not None}


class EvaluationSpec(StrictModel):
    batch_size: int = Field(32, gt=0)
    max_examples: int | None = Field(256, gt=0, description="examples sampled per evaluated set")
    seed: int = 0
    top_examples: int = Field(10, ge=0, description="drill-down rows kept per cell (UnTrac-Inv)")


class ResourcesSpec(StrictModel):
    address: str | None = Field(None, description="Ray cluster address; none = embedded local Ray")
    num_actors: int | None = Field(None, gt=0, description="default: one per GPU or CPU slot")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    local_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded local Ray")
    object_store_memory_mb: int | None = Field(None, gt=0)
    max_retries: int = Field(
        2, ge=0, description="times a task whose actor died runs again on another actor")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="actors' forward passes: float32, or bfloat16 autocast"
    )
    tf32: bool = Field(False, description="allow TF32 matmuls on CUDA GPUs")
    weights_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="the dtype actors keep the model's weights (and so its gradients "
        "and optimizer state) in: bf16 halves their memory")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (long sequences: "
        "less memory, about a third more compute)")
    placement_timeout_s: float = Field(
        30.0, gt=0, description="how long the pool waits for room for its actors before it "
        "starts with those that fit (a fixed cluster)")
    autoscale: bool = Field(
        False, description="the cluster adds nodes on demand: ask its autoscaler for "
        "num_actors actors and start each as its node joins")
    actors_per_task: int = Field(
        1, ge=1, description="a gang of N actors (each with cpus_per_actor and gpus_per_actor, "
        "all on one node) runs every task sharded with FSDP: models larger than one GPU; "
        "N x gpus_per_actor GPUs per task, num_actors counts all the gangs' actors")

    @model_validator(mode="after")
    def _autoscale_needs_a_size(self) -> ResourcesSpec:
        if self.autoscale and self.num_actors is None:
            raise ValueError("autoscale: give num_actors too (how many actors to ask the "
                             "autoscaler for)")
        return self

    @model_validator(mode="after")
    def _gangs_fit(self) -> ResourcesSpec:
        n = self.actors_per_task
        if n == 1:
            return self
        if self.num_actors is not None and self.num_actors % n:
            raise ValueError(f"num_actors: {self.num_actors} actors do not make whole gangs of "
                             f"actors_per_task: {n}; give a multiple of {n}")
        if self.weights_dtype != "fp32":
            raise ValueError(f"weights_dtype: {self.weights_dtype} is not available with "
                             f"actors_per_task: {n} (a sharded model keeps fp32 weights; "
                             "precision: bf16 computes in bfloat16)")
        if self.gradient_checkpointing:
            raise ValueError(f"gradient_checkpointing: not available with actors_per_task: {n}")
        return self


class PretrainingSpec(StrictModel):
    """A general stage before the training mixture (run once, cached): the base model and the
    leave-dataset-out retrainings all start from its result, as the paper's start from a
    pretrained model."""

    data: list[DatasetSpec] = Field(min_length=1)
    training: TrainingSpec = TrainingSpec()


class GroundTruthSpec(StrictModel):
    """An earlier run whose `ldo` matrix is the ground truth for this job's estimates."""

    run_id: str = Field(min_length=1)
    tracking_uri: str | None = Field(None, description="default: this job's tracking URI")


class CalibrationSpec(StrictModel):
    """The calibration (`untrac-ray calibrate`) whose choice this job runs: its verdict cites
    what the proxy measured."""

    run_id: str = Field(min_length=1)
    tracking_uri: str | None = Field(None, description="default: this job's tracking URI")


class TrackingSpec(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///mlflow.db")
    experiment: str = "untrac-ray"


