"""The job spec: one YAML file, validated on load, the single source of truth for a job.

Relative paths in a spec are resolved against the folder of the spec file, so a job runs the
same from any working directory (and on a cluster, where the file travels with its data).
A `${NAME}` in any string is the environment variable NAME, so that a secret (a token in a
data URI, a tracking password) need not be written in the file.

The whole job is `JobSpec`, made of the sections in spec_sections.py, spec_methods.py and
spec_search.py; loading.py reads it from YAML, fingerprints.py hashes what decides results.
"""

from __future__ import annotations

import yaml
from pydantic import Field, model_validator

from untrac_ray.inputs.hub import is_hub_id
from untrac_ray.inputs.spec_methods import MethodsSpec
from untrac_ray.inputs.spec_search import SearchSpec
from untrac_ray.inputs.spec_sections import (
    SHARDED_REFUSED,
    SHARDED_UNLEARNING,
    UNLEARNING_METHODS,
    CalibrationSpec,
    DataSpec,
    EvaluationSpec,
    GroundTruthSpec,
    ModelSpec,
    PretrainingSpec,
    ResourcesSpec,
    StrictModel,
    TokenizerSpec,
    TrackingSpec,
    TrainingSpec,
)


class JobSpec(StrictModel):
    """A whole job. Load it with `load_spec`."""

    name: str = Field(min_length=1)
    model: ModelSpec
    tokenizer: TokenizerSpec = TokenizerSpec()
    pretraining: PretrainingSpec | None = None
    training: TrainingSpec = TrainingSpec()
    data: DataSpec
    methods: MethodsSpec
    ground_truth: GroundTruthSpec | None = None
    calibration: CalibrationSpec | None = Field(
        None, description="the calibration that chose this job's method (`calibrate`)")
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
                                    ("ensemble", 1), ("objective", "ascent"),
                                    ("kl_weight", 0.0)):
                    if u is not None and getattr(u, name) != plain:
                        raise ValueError(f"methods.{method}.{name}: `tune` runs the paper's "
                                         "unlearning only; run this variant with `run`")
            if self.search.objective.function is None and (
                    self.search.objective.metric == "lds") and self.methods.lds is None:
                raise ValueError("search.objective.metric: lds scores against retraining on "
                                 "random subsets; add methods.lds (computed once before the "
                                 "trials)")
            if self.search.objective.function is None and not (
                self.ground_truth or "ldo" in self.methods.enabled()
                or self.search.objective.metric == "lds"
            ):
                raise ValueError(
                    f"search.objective: {self.search.objective.metric} scores against the "
                    "ground truth; add methods.ldo (computed once before the trials) or "
                    "ground_truth.run_id, or give objective.function"
                )
        return self

    @model_validator(mode="after")
    def _noise_seed_is_another(self) -> JobSpec:
        """The LDS's ceiling retrains subsets under a seed that none of its truth's seeds is
        (those default to training.seed, which MethodsSpec does not know)."""
        lds = self.methods.lds
        if lds is not None and lds.noise_subsets and lds.noise_seed is not None:
            seeds = self.methods.lds_seeds(self.training.seed)
            if lds.noise_seed in seeds:
                raise ValueError(f"methods.lds.noise_seed: {lds.noise_seed} is one of the "
                                 f"seeds the subsets are retrained with ({seeds}); the ceiling "
                                 "needs the same subsets under another seed")
        return self

    @model_validator(mode="after")
    def _tokenizer_of_the_model(self) -> JobSpec:
        """A model folder is read with its own tokenizer unless the spec names another; a
        model built from model.config with the byte-level one. For a Hub model tokenizer.path
        stays null: the snapshot folder of its commit, known once resolved (inputs/hub.py)."""
        tok = self.tokenizer
        if tok.kind is None:
            tok.kind = "pretrained" if self.model.path else "byte"
        if tok.kind == "pretrained" and not tok.path:
            if not self.model.path:
                raise ValueError("tokenizer.path: the model is built from model.config, which "
                                 "has no tokenizer: give a local tokenizer folder")
            if not is_hub_id(self.model.path):
                tok.path = self.model.path
        return self

    @model_validator(mode="after")
    def _methods_fit_the_model(self) -> JobSpec:
        enabled = self.methods.enabled()
        for method, needs in (("ldo", "retrain it without each set"),
                              ("lds", "retrain it on subsets of the training sets"),
                              ("tracin", "checkpoint it")):
            if method in enabled and not self.model.trained_by_job:
                raise ValueError(
                    f"methods.{method}: needs a model that this job trains (model.config, or "
                    f"model.path with finetune: true) so that it can {needs}"
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
            if settings is not None and (settings.objective != "ascent" or settings.kl_weight):
                raise ValueError(f"methods.{method}: NPO and the KL term need the base model's "
                                 f"losses or logits beside a sharded one ({gang}); run them with "
                                 "actors_per_task: 1")
        if self.search is not None:
            raise ValueError(f"search: trials run without gangs; a job with {gang} has no "
                             "search (use actors_per_task: 1 for `tune`)")
        return self

    def to_yaml(self) -> str:
        """The resolved spec (absolute paths, defaults filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def text_datasets(self) -> list[tuple[str, str]]:
        """(spec key, name) of every dataset of kind text, pretraining included."""
        sets = [("data.train", d) for d in self.data.train]
        sets += [("data.test", d) for d in self.data.test]
        sets += [("pretraining.data", d) for d in (self.pretraining.data if self.pretraining
                                                   else [])]
        return [(where, ds.name) for where, ds in sets if ds.kind == "text"]
