"""A hyperparameter search in a job spec (`search:`, run by `untrac-ray tune`): the space of
unlearning settings, the objective, the algorithm and scheduler, and where Tune stores trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from untrac_ray.inputs.spec_methods import MethodsSpec, UnlearnSpec
from untrac_ray.inputs.spec_sections import UNLEARNING_METHODS, StrictModel

SEARCH_DOMAINS = ("loguniform", "uniform", "randint", "lograndint", "choice")
SEARCHABLE = ("optimizer", "learning_rate", "batch_size", "micro_batch_size", "epochs",
              "max_steps", "max_grad_norm", "seed")
_INTEGER_SETTINGS = ("batch_size", "micro_batch_size", "epochs", "max_steps", "seed")
BUILTIN_OBJECTIVES = ("pearson_mean", "spearman_mean", "pearson_all", "spearman_all")


class SearchDomain(StrictModel):
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


class ObjectiveSpec(StrictModel):
    """What a trial is scored by, at every evaluation step of the unlearning trajectory."""

    metric: Literal["pearson_mean", "spearman_mean", "pearson_all", "spearman_all",
                    "lds"] = Field(
        "pearson_mean", description="correlation with leave-dataset-out: mean over test sets, "
        "or pooled over all cells; or lds: the linear datamodeling score (methods.lds)",
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


class SchedulerSpec(StrictModel):
    """Early stopping over the evaluation steps (rounds) of the trajectory."""

    kind: Literal["fifo", "asha"] = Field("fifo", description="fifo: no early stopping")
    grace_period: int = Field(1, gt=0, description="rounds every trial runs before a stop")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, gt=0, description="most rounds of a trial (default: none)")


class SearchSpec(StrictModel):
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


