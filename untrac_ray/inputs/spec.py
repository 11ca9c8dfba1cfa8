"""The job spec: one YAML file, validated on load, the single source of truth for a job.

Relative paths in a spec are resolved against the folder of the spec file, so a job runs the
same from any working directory (and on a cluster, where the file travels with its data).
A `${NAME}` in any string is the environment variable NAME, so that a secret (a token in a
data URI, a tracking password) need not be written in the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.redaction import expand_env, redact

Optimizer = Literal["adam", "sgd", "adafactor"]
METHODS: tuple[str, ...] = ("untrac", "untrac_inv", "ldo", "graddot", "gradcos", "tracin", "ekfac")
UNLEARNING_METHODS = ("untrac", "untrac_inv")
GROUND_TRUTH = "ldo"
# With resources.actors_per_task > 1 (a gang, sharded.py): the methods a sharded bench cannot
# run, and the unlearning optimizers it can (elementwise updates work on shards; training.
# optimizer, LDO's, is always one of them).
SHARDED_REFUSED = ("graddot", "gradcos", "tracin", "ekfac")
SHARDED_UNLEARNING = ("adam", "sgd")
KRONFLUENCE_INSTALL = (
    "pip install 'untrac-ray[ekfac]' && pip install --no-deps kronfluence==1.0.1"
)
DATA_FORMATS = ("csv", "jsonl", "parquet", "hf_disk")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    def __repr__(self) -> str:  # a spec in a traceback or a log shows no credential
        return redact(super().__repr__())

    def __str__(self) -> str:
        return redact(super().__str__())


def is_uri(path: str) -> bool:
    """True for remote sources such as s3://bucket/key (opened through pyarrow's filesystems)."""
    return "://" in path


class TokenizerSpec(_Strict):
    """Which tokenizer to use: a byte-level one built in code (no download), or a local folder."""

    kind: Literal["byte", "pretrained"] = "byte"
    path: str | None = None
    max_length: int = Field(128, gt=1, description="longest prompt+target row, in tokens")
    block_size: int = Field(128, gt=1, description="length of packed blocks for text rows")

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> TokenizerSpec:
        if self.kind == "pretrained" and not self.path:
            raise ValueError("kind 'pretrained' needs a path to a local tokenizer folder")
        return self


class TrainingSpec(_Strict):
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

    def checkpoint_steps(self, total_steps: int) -> list[int]:
        """Steps at which `train` keeps a checkpoint (for TracIn), within the run."""
        steps = set(s for s in (self.checkpoints or []) if 0 < s <= total_steps)
        if self.checkpoint_every:
            steps.update(range(self.checkpoint_every, total_steps + 1, self.checkpoint_every))
        return sorted(steps)


class ModelSpec(_Strict):
    """The model under study: a local Hugging Face folder, or a config to train from scratch."""

    path: str | None = None
    config: dict[str, Any] | None = None
    finetune: bool = Field(
        False, description="fine-tune the model at `path` on the training sets before study"
    )

    @property
    def trained_by_job(self) -> bool:
        """True when the studied model is trained by untrac-ray (so it can be retrained: LDO)."""
        return self.config is not None or self.finetune

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of 'path' (a local model folder) or 'config'")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config needs a 'model_type' (for example gpt2)")
        return self


class DatasetSpec(_Strict):
    """One named dataset: where its rows come from and what kind of rows they are."""

    name: str = Field(min_length=1)
    source: str = Field(min_length=1, description="CSV, JSON Lines, Parquet or a datasets folder")
    format: Literal["csv", "jsonl", "parquet", "hf_disk"] | None = None
    kind: Literal["text", "prompt_target"] = "prompt_target"
    subset: str | None = Field(None, description="keep rows whose subset_column equals this")
    max_rows: int | None = Field(
        None, gt=0, description="keep the first max_rows rows (after subset), e.g. to cut a "
        "set to a size"
    )
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
        if name != name.strip() or "/" in name:
            raise ValueError(f"name {name!r} must not contain '/' or surrounding spaces")
        return name

    def resolved_format(self) -> str:
        """The format given, or the one the source's suffix implies."""
        if self.format:
            return self.format
        lower = self.source.lower().split("?", 1)[0].rstrip("/")  # a URI's ?query aside
        for suffix, fmt in ((".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl"),
                            (".parquet", "parquet"), (".pq", "parquet")):
            if lower.endswith(suffix):
                return fmt
        if not is_uri(self.source) and Path(self.source).is_dir():
            return "hf_disk"
        raise ValueError(
            f"cannot tell the format of {self.source!r}; set format to one of "
            + ", ".join(DATA_FORMATS)
        )


class DataSpec(_Strict):
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


class UnlearnSpec(_Strict):
    """Gradient-ascent settings of one method (the unlearning loop in unlearning.py).

    Where a trajectory is evaluated: `eval_points: P` evaluates every set at 1/P, 2/P ... P/P of
    its own schedule, so that sets of different sizes line up by progress (a bigger set takes
    more steps per point). `eval_steps` / `eval_every` name absolute steps instead; they are
    counted on the longest trajectory, and shorter ones are evaluated at the same fractions of
    their own schedule (equal-size sets: exactly the steps named). schedule.py resolves both.
    """

    optimizer: Optimizer = "adam"
    learning_rate: float = Field(5e-5, ge=0)
    batch_size: int = Field(1, gt=0)
    micro_batch_size: int | None = Field(None, gt=0, description="split batches to save memory")
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    max_grad_norm: float | None = Field(None, gt=0)
    eval_points: int | None = Field(
        None, gt=0, description="evaluate at 1/P ... P/P of each set's own schedule"
    )
    eval_steps: list[int] | None = Field(None, description="steps at which to evaluate")
    eval_every: int | None = Field(None, gt=0)
    score_point: int | None = Field(
        None, gt=0, description="the evaluation point whose scores are the headline, fixed in "
        "advance (default: the last)",
    )
    seed: int = 0
    # Variants that bring unlearning a set closer to "trained without it" (README: Unlearning
    # variants). The defaults are the paper's UnTrac.
    retain_weight: float = Field(
        0.0, ge=0, description="each ascent step also descends on a batch of the sets that are "
        "kept (UnTrac: the other training sets; UnTrac-Inv: the other test sets), weighted by "
        "this, so that skills they share with the unlearned set stay")
    retain_batch_size: int | None = Field(
        None, gt=0, description="rows of that batch (default: batch_size)")
    stop_loss_rise: float | None = Field(
        None, gt=0, description="stop once the unlearned set's own loss rose this much (mean "
        "token loss) above the base model's, so every set is forgotten to the same degree; "
        "max_steps or epochs cap the run; one evaluation point, where it stopped")
    stop_check_every: int = Field(
        1, gt=0, description="steps between checks of the stopping rule (each evaluates the "
        "unlearned set's evaluation rows)")
    ensemble: int = Field(
        1, ge=1, description="unlearn each set with this many seeds (seed, seed+1, ...: batch "
        "orders and dropout) and average the cells; costs that many times the compute")

    @field_validator("eval_steps")
    @classmethod
    def _positive_steps(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None:
            if not steps:
                raise ValueError("eval_steps must not be empty")
            if any(s <= 0 for s in steps):
                raise ValueError("eval_steps must be positive step numbers")
        return steps

    @model_validator(mode="after")
    def _one_kind_of_schedule(self) -> UnlearnSpec:
        if self.eval_points is not None and (self.eval_steps or self.eval_every):
            raise ValueError("eval_points: give either eval_points (progress through each "
                             "set's schedule) or eval_steps/eval_every (absolute steps)")
        if self.stop_loss_rise is not None and (
                (self.eval_points or 1) > 1 or self.eval_steps or self.eval_every):
            raise ValueError("stop_loss_rise: a trajectory that stops by its loss has one "
                             "evaluation point, where it stops; drop eval_points/eval_steps/"
                             "eval_every")
        if self.eval_points is not None and self.score_point is not None and (
                self.score_point > self.eval_points):
            raise ValueError(f"score_point: {self.score_point} is beyond the last of "
                             f"{self.eval_points} eval_points")
        return self

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps for a dataset of n_rows: max_steps, else epochs over the rows."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(n_rows / self.batch_size)


class LdoSpec(_Strict):
    """Leave-dataset-out retraining, the ground truth: one retraining per training set and seed."""

    seeds: list[int] | None = Field(
        None, description="training seeds; the ground truth is the mean over them "
        "(default: training.seed)", min_length=1,
    )


class GradientSpec(_Strict):
    """GradDot, GradCos and TracIn: dataset-level gradients accumulated over batches.

    `aggregate` is how a training set's examples add up. mean (the default, the paper's): the
    gradient of its mean token loss, every set on the same footing; sum: of its summed token
    loss, so a set with more tokens weighs more, as in a first-order view of training without
    it. On sets of unequal size (jobs/synthetic_b_unequal.yaml, README) mean followed
    leave-dataset-out as well or slightly better. The test side is always the mean token loss
    that UnTrac measures. GradCos is the same under both (a cosine ignores scale).
    """

    batch_size: int = Field(32, gt=0)
    aggregate: Literal["sum", "mean"] = Field(
        "mean", description="training-set gradient of the mean or summed token loss"
    )


class EkfacSpec(_Strict):
    """Influence functions with EK-FAC (kronfluence).

    Aggregated like the gradient baselines: the test side is the gradient of the test set's
    mean token loss; `aggregate` sum takes the training set's summed token loss (rows sampled
    by max_train_examples are scaled up to the whole set's tokens), mean its mean token loss.
    """

    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = "ekfac"
    damping: float | None = Field(None, gt=0, description="default: kronfluence's heuristic")
    batch_size: int = Field(16, gt=0)
    max_train_examples: int | None = Field(
        None, gt=0, description="rows per training set scored (default: all)"
    )
    aggregate: Literal["sum", "mean"] = Field(
        "mean", description="training-set influence of its mean or summed token loss"
    )


class MethodsSpec(_Strict):
    """The methods to run, each with its own settings."""

    untrac: UnlearnSpec | None = None
    untrac_inv: UnlearnSpec | None = None
    ldo: LdoSpec | None = None
    graddot: GradientSpec | None = None
    gradcos: GradientSpec | None = None
    tracin: GradientSpec | None = None
    ekfac: EkfacSpec | None = None

    @field_validator("ekfac")
    @classmethod
    def _kronfluence_installed(cls, value: EkfacSpec | None) -> EkfacSpec | None:
        if value is not None:
            import importlib.util

            if importlib.util.find_spec("kronfluence") is None:
                raise ValueError(
                    "method ekfac needs the kronfluence library, which is not installed; "
                    f"install it without its dependencies: {KRONFLUENCE_INSTALL}"
                )
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> MethodsSpec:
        if not self.enabled():
            raise ValueError("name at least one method: " + ", ".join(METHODS))
        return self

    def enabled(self) -> dict[str, Any]:
        """The requested methods by name, in a fixed order."""
        return {m: getattr(self, m) for m in METHODS if getattr(self, m) is not None}

    def estimates(self) -> list[str]:
        """The requested methods other than the ground truth."""
        return [m for m in self.enabled() if m != GROUND_TRUTH]


class EvaluationSpec(_Strict):
    batch_size: int = Field(32, gt=0)
    max_examples: int | None = Field(256, gt=0, description="examples sampled per evaluated set")
    seed: int = 0
    top_examples: int = Field(10, ge=0, description="drill-down rows kept per cell (UnTrac-Inv)")


class ResourcesSpec(_Strict):
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


class PretrainingSpec(_Strict):
    """A general stage before the training mixture (run once, cached): the base model and the
    leave-dataset-out retrainings all start from its result, as the paper's start from a
    pretrained model."""

    data: list[DatasetSpec] = Field(min_length=1)
    training: TrainingSpec = TrainingSpec()


class GroundTruthSpec(_Strict):
    """An earlier run whose `ldo` matrix is the ground truth for this job's estimates."""

    run_id: str = Field(min_length=1)
    tracking_uri: str | None = Field(None, description="default: this job's tracking URI")


class TrackingSpec(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///mlflow.db")
    experiment: str = "untrac-ray"


SEARCH_DOMAINS = ("loguniform", "uniform", "randint", "lograndint", "choice")
SEARCHABLE = ("optimizer", "learning_rate", "batch_size", "micro_batch_size", "epochs",
              "max_steps", "max_grad_norm", "seed")
_INTEGER_SETTINGS = ("batch_size", "micro_batch_size", "epochs", "max_steps", "seed")
BUILTIN_OBJECTIVES = ("pearson_mean", "spearman_mean", "pearson_all", "spearman_all")


class SearchDomain(_Strict):
    """Where one setting is searched: exactly one of the kinds. Ranges are [low, high] (the
    integer ones inclusive); a bare list is a choice."""

    loguniform: list[float] | None = None
    uniform: list[float] | None = None
    randint: list[int] | None = None
    lograndint: list[int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _list_is_a_choice(cls, value: Any) -> Any:
        return {"choice": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_valid_kind(self) -> SearchDomain:
        given = [k for k in SEARCH_DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of " + ", ".join(SEARCH_DOMAINS)
                             + (f" (got {', '.join(given)})" if given else ""))
        kind, values = given[0], getattr(self, given[0])
        if kind == "choice":
            if not values:
                raise ValueError("choice is empty: list at least one value")
            return self
        if len(values) != 2:
            raise ValueError(f"{kind} takes [low, high] (got {values})")
        low, high = values
        if kind.startswith("log") and low <= 0:
            raise ValueError(f"{kind} bounds must be positive (got {values})")
        if low > high or (low == high and kind in ("loguniform", "uniform")):
            raise ValueError(f"{kind} needs low < high (got {values})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SEARCH_DOMAINS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        """The choices, or the [low, high] bounds of a range."""
        return list(getattr(self, self.kind))


class ObjectiveSpec(_Strict):
    """What a trial is scored by, at every evaluation step of the unlearning trajectory."""

    metric: Literal["pearson_mean", "spearman_mean", "pearson_all", "spearman_all"] = Field(
        "pearson_mean", description="correlation with the ground truth: mean over test sets, "
        "or pooled over all cells",
    )
    function: str | None = Field(
        None, description="a user metric instead: 'package.module:function' or "
        "'file.py:function', called as function(table, truth) -> float",
    )
    mode: Literal["max", "min"] = "max"
    methods: list[Literal["untrac", "untrac_inv"]] | None = Field(
        None, min_length=1, description="methods run and scored (default: the job's "
        "unlearning methods; the objective is their mean)",
    )
    step: Literal["last", "best"] = Field(
        "last", description="a trial's objective: at the last step, or the best step so far"
    )

    @field_validator("function")
    @classmethod
    def _module_colon_name(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"expected 'module:function' or 'file.py:function' (got {value!r})")
        return value


class SchedulerSpec(_Strict):
    """Early stopping over the evaluation steps (rounds) of the trajectory."""

    kind: Literal["fifo", "asha"] = Field("fifo", description="fifo: no early stopping")
    grace_period: int = Field(1, gt=0, description="rounds every trial runs before a stop")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, gt=0, description="most rounds of a trial (default: none)")


class SearchSpec(_Strict):
    """A hyperparameter search over the unlearning settings (`untrac-ray tune`)."""

    space: dict[str, SearchDomain] = Field(
        min_length=1, description="'<method>.<setting>' -> domain, e.g. untrac.learning_rate"
    )
    objective: ObjectiveSpec = ObjectiveSpec()
    algorithm: Literal["random", "grid", "optuna"] = "random"
    trials: int | None = Field(None, gt=0, description="default 8; grid: every combination")
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent: int | None = Field(None, gt=0, description="default: as many as fit")
    actors_per_trial: int = Field(1, gt=0)
    max_failures: int = Field(0, ge=0, description="retries of a trial whose worker died")
    seed: int = 0
    storage_path: str | None = Field(
        None, description="Ray Tune's storage (shared folder or URI on clusters); "
        "default <cache_dir>/tune"
    )

    @field_validator("algorithm")
    @classmethod
    def _optuna_installed(cls, value: str) -> str:
        import importlib.util

        if value == "optuna" and importlib.util.find_spec("optuna") is None:
            raise ValueError("algorithm optuna needs the optuna library, which is not "
                             "installed: pip install optuna (or untrac-ray[optuna])")
        return value

    @model_validator(mode="after")
    def _grid_and_trials(self) -> SearchSpec:
        if self.algorithm == "grid":
            for key, domain in self.space.items():
                if domain.kind != "choice":
                    raise ValueError(f"space.{key}: a grid search takes lists of values "
                                     f"(choice), not {domain.kind}")
            if self.trials is not None and self.trials != self.grid_size():
                raise ValueError(f"trials: a grid search runs every combination "
                                 f"({self.grid_size()}); leave trials out")
        return self

    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space.values())

    def num_trials(self) -> int:
        if self.algorithm == "grid":
            return self.grid_size()
        return self.trials or 8

    def resolve_paths(self, absolute: Callable[[str | None], str | None]) -> None:
        """Make a local storage path and a metric file absolute (from the job's folder)."""
        self.storage_path = absolute(self.storage_path)
        target = self.objective.function
        if target and target.split(":")[0].endswith(".py"):
            path, name = target.split(":")
            self.objective.function = f"{absolute(path)}:{name}"

    def check_against(self, methods: MethodsSpec) -> None:
        """Raise ValueError naming the key when the space does not fit the job's methods."""
        scored = self.objective.methods or [m for m in UNLEARNING_METHODS
                                            if getattr(methods, m) is not None]
        if not scored:
            raise ValueError("search: needs methods.untrac or methods.untrac_inv (the search "
                             "tunes their unlearning settings)")
        for m in scored:
            if getattr(methods, m) is None:
                raise ValueError(f"search.objective.methods: {m} is not in methods; add "
                                 f"methods.{m} with its base settings")
        for key, domain in self.space.items():
            loc = f"search.space.{key}"
            method, _, setting = key.partition(".")
            if not setting:
                raise ValueError(f"{loc}: name the method and the setting, e.g. "
                                 f"untrac.{key} or untrac_inv.{key}")
            if method not in UNLEARNING_METHODS:
                raise ValueError(f"{loc}: {method!r} is not an unlearning method "
                                 f"({', '.join(UNLEARNING_METHODS)})")
            if method not in scored:
                raise ValueError(f"{loc}: {method} is not run by the search; add it to "
                                 "methods (and to search.objective.methods if given)")
            if setting not in SEARCHABLE:
                raise ValueError(f"{loc}: unknown setting {setting!r} (searchable: "
                                 f"{', '.join(SEARCHABLE)})")
            if setting in _INTEGER_SETTINGS and domain.kind in ("loguniform", "uniform"):
                raise ValueError(f"{loc}: {setting} is an integer; use randint, lograndint "
                                 "or a list of values")
            if setting == "optimizer" and domain.kind != "choice":
                raise ValueError(f"{loc}: list the optimizers to try (a choice)")
            base = getattr(methods, method).model_dump()
            for value in domain.values:
                try:
                    UnlearnSpec.model_validate({**base, setting: value})
                except ValidationError as err:
                    first = err.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{loc}: value {value!r} is refused: {first}") from None


class JobSpec(_Strict):
    """A whole job. Load it with `load_spec`."""

    name: str = Field(min_length=1)
    model: ModelSpec
    tokenizer: TokenizerSpec = TokenizerSpec()
    pretraining: PretrainingSpec | None = None
    training: TrainingSpec = TrainingSpec()
    data: DataSpec
    methods: MethodsSpec
    ground_truth: GroundTruthSpec | None = None
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    cache_dir: str | None = Field(
        None, description="trained models and tokenized data; default ./.untrac-ray"
    )
    search: SearchSpec | None = Field(None, description="hyperparameter search (`tune`)")

    @model_validator(mode="after")
    def _search_fits_the_job(self) -> JobSpec:
        if self.search is not None:
            self.search.check_against(self.methods)
            for method in ("untrac", "untrac_inv"):
                u = self.methods.enabled().get(method)
                for name, plain in (("retain_weight", 0.0), ("stop_loss_rise", None),
                                    ("ensemble", 1)):
                    if u is not None and getattr(u, name) != plain:
                        raise ValueError(f"methods.{method}.{name}: `tune` runs the paper's "
                                         "unlearning only; run this variant with `run`")
            if self.search.objective.function is None and not (
                self.ground_truth or "ldo" in self.methods.enabled()
            ):
                raise ValueError(
                    f"search.objective: {self.search.objective.metric} scores against the "
                    "ground truth; add methods.ldo (computed once before the trials) or "
                    "ground_truth.run_id, or give objective.function"
                )
        return self

    @model_validator(mode="after")
    def _methods_fit_the_model(self) -> JobSpec:
        enabled = self.methods.enabled()
        for method in ("ldo", "tracin"):
            if method in enabled and not self.model.trained_by_job:
                raise ValueError(
                    f"methods.{method}: needs a model that this job trains (model.config, or "
                    "model.path with finetune: true) so that it can retrain or checkpoint it"
                )
        has_checkpoints = self.training.checkpoints or self.training.checkpoint_every
        if "tracin" in enabled and not has_checkpoints:
            raise ValueError(
                "methods.tracin: needs training checkpoints: set training.checkpoints or "
                "training.checkpoint_every"
            )
        if self.pretraining is not None and self.model.config is None:
            raise ValueError("pretraining: only for a model built from model.config")
        if self.ground_truth is not None and "ldo" in enabled:
            raise ValueError("ground_truth: the job computes ldo itself; give one or the other")
        return self

    @model_validator(mode="after")
    def _methods_run_sharded(self) -> JobSpec:
        """With gangs (resources.actors_per_task > 1) every task runs sharded: refuse what a
        sharded bench cannot run (sharded.check_sharded_task), one line for the first."""
        n = self.resources.actors_per_task
        if n == 1:
            return self
        gang = f"resources.actors_per_task: {n}"
        for method in SHARDED_REFUSED:
            if getattr(self.methods, method) is not None:
                raise ValueError(f"methods.{method}: cannot run sharded ({gang}): it needs "
                                 "whole gradients or a whole model; run it with "
                                 "actors_per_task: 1")
        for method in UNLEARNING_METHODS:
            settings = getattr(self.methods, method)
            if settings is not None and settings.optimizer not in SHARDED_UNLEARNING:
                raise ValueError(f"methods.{method}.optimizer: {settings.optimizer} cannot "
                                 f"update sharded parameters ({gang}); use "
                                 f"{' or '.join(SHARDED_UNLEARNING)}")
        if self.search is not None:
            raise ValueError(f"search: trials run without gangs; a job with {gang} has no "
                             "search (use actors_per_task: 1 for `tune`)")
        return self

    def pretrain_key(self) -> str:
        """Hash of what decides the pretrained starting point (model, tokenizer, pretraining)."""
        assert self.pretraining is not None
        return spec_hash(
            self.model.model_dump(), self.tokenizer.model_dump(),
            self.pretraining.training.model_dump(exclude={"output_dir"}),
            [ds.model_dump() for ds in self.pretraining.data],
            [file_fingerprint(ds.source) for ds in self.pretraining.data],
        )

    def model_key(self) -> str:
        """Hash of everything that decides the trained base model (model, tokenizer, data)."""
        return spec_hash(
            self.pretrain_key() if self.pretraining else None,
            self.model.model_dump(),
            file_fingerprint(self.model.path) if self.model.finetune else None,
            self.tokenizer.model_dump(),
            self.training.model_dump(exclude={"output_dir"}),
            [ds.model_dump() for ds in self.data.train],
            [file_fingerprint(ds.source) for ds in self.data.train],
        )

    def to_yaml(self) -> str:
        """The resolved spec (absolute paths, defaults filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @model_validator(mode="after")
    def _encoder_decoder_needs_prompts(self) -> JobSpec:
        """An encoder-decoder model (T5) reads the prompt and predicts the target: text rows,
        packed into blocks, have no such split. A model folder is checked by preflight.py,
        once its path is resolved."""
        text = self.text_datasets()
        if not text or self.model.config is None:  # spare the import of torch otherwise
            return self
        if is_encoder_decoder(self.model.config):
            raise ValueError(encoder_decoder_refusal(*text[0]))
        return self

    def text_datasets(self) -> list[tuple[str, str]]:
        """(spec key, name) of every dataset of kind text, pretraining included."""
        sets = [("data.train", d) for d in self.data.train]
        sets += [("data.test", d) for d in self.data.test]
        sets += [("pretraining.data", d) for d in (self.pretraining.data if self.pretraining
                                                   else [])]
        return [(where, ds.name) for where, ds in sets if ds.kind == "text"]


def is_encoder_decoder(config: Any) -> bool:
    """True for an encoder-decoder config (T5, BART...): a transformers config or a mapping
    with a model_type (as in model.config of a spec)."""
    if not isinstance(config, dict):
        return bool(getattr(config, "is_encoder_decoder", False))
    if "is_encoder_decoder" in config:
        return bool(config["is_encoder_decoder"])
    from transformers import AutoConfig  # here, so that loading a spec stays light

    try:
        return bool(AutoConfig.for_model(config["model_type"]).is_encoder_decoder)
    except Exception:  # noqa: BLE001 - an unknown model_type is reported when the model is built
        return False


def encoder_decoder_refusal(where: str, name: str) -> str:
    """The one line that refuses a text dataset for an encoder-decoder model."""
    return (f"{where}: dataset {name!r} is text, but an encoder-decoder model (model_type "
            "t5...) needs prompt_target rows (text blocks have no prompt/target split)")


def spec_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(source: str) -> str:
    """Content hash of a local file or folder (size and mtime for large ones); URIs as given."""
    path = Path(source)
    if is_uri(source) or not path.exists():
        return source
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(str(f.relative_to(path.parent)).encode())
        if stat.st_size <= 64 * 2**20:
            digest.update(f.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _format_validation_error(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("model_type",) and not isinstance(
            e["input"], dict | list
        ):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{origin}: " + "; ".join(parts)


def _resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    def absolute(p: str | None) -> str | None:
        if p is None or is_uri(p) or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    spec.model.path = absolute(spec.model.path)
    if spec.tokenizer.path:
        spec.tokenizer.path = absolute(spec.tokenizer.path)
    spec.training.output_dir = absolute(spec.training.output_dir)
    spec.cache_dir = absolute(spec.cache_dir) or str(Path.cwd() / ".untrac-ray")
    pretraining = spec.pretraining.data if spec.pretraining else []
    for ds in [*spec.data.train, *spec.data.test, *pretraining]:
        ds.source = absolute(ds.source) or ds.source
    if spec.search is not None:  # a user metric given as a file, and Tune's storage
        spec.search.resolve_paths(absolute)
    return spec


def parse_spec(raw: Any, origin: str = "job spec", base_dir: Path | None = None) -> JobSpec:
    """Validate a spec given as a mapping; raise SpecError naming each bad key."""
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a mapping of keys at the top level")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None
    if base_dir is not None:
        spec = _resolve_paths(spec, base_dir)
    return spec


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job YAML file. Relative paths in it are taken from its folder."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"job file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise SpecError(f"job file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the job file: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at position {err.start}, "
            f"line {line}); save the file as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    raw = expand_env_refs(raw, origin=str(path))
    return parse_spec(raw, origin=str(path), base_dir=path.resolve().parent)


def expand_env_refs(raw: Any, origin: str = "job spec", where: str = "") -> Any:
    """Every `${NAME}` in the spec's strings replaced by that environment variable, so that a
    secret (a token in a data URI, say) need not be written in the job file; SpecError naming
    the key when a variable is not set."""
    if isinstance(raw, str):
        try:
            return expand_env(raw)
        except KeyError as err:
            raise SpecError(f"{origin}: {where or '(top level)'}: ${{{err.args[0]}}} is not set "
                            "in the environment") from None
    if isinstance(raw, dict):
        return {k: expand_env_refs(v, origin, f"{where}.{k}" if where else str(k))
                for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand_env_refs(v, origin, f"{where}.{i}") for i, v in enumerate(raw)]
    return raw
