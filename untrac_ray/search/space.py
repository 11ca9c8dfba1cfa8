"""What a search explores and how a trial is scored: the space as Ray Tune domains, a trial's
settings as a job, and the objective (a correlation with the ground truth, or a user metric).
Pure functions over the spec and the tidy table; no Ray, no MLflow.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from untrac_ray.inputs.errors import InputError
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.inputs.spec_search import SearchSpec
from untrac_ray.inputs.spec_sections import UNLEARNING_METHODS, GroundTruthSpec
from untrac_ray.methods.cells import COLUMNS
from untrac_ray.results.score_views import latest_values
from untrac_ray.results.scores import score_frame
from untrac_ray.results.scoring import ALL_CELLS, MEAN_OVER_TESTS

OBJECTIVE = "objective"
CELL_FIELDS = COLUMNS  # a report's cells travel as lists in this order
# objective.metric -> (score, test set) of the one score table (results/scores.py)
_SCORE_FIELD = {"pearson_mean": ("pearson", MEAN_OVER_TESTS),
                "spearman_mean": ("spearman", MEAN_OVER_TESTS),
                "pearson_all": ("pearson", ALL_CELLS), "spearman_all": ("spearman", ALL_CELLS),
                "lds": ("lds", MEAN_OVER_TESTS)}


class SearchError(InputError):
    """A search cannot start or resume (nothing to resume, a trial that cannot fit)."""



# ------------------------------------------------------------------ the space and the settings


def tune_space(search: SearchSpec) -> dict[str, dict[str, Any]]:
    """The search space as Ray Tune domains, nested by method: {"untrac": {"learning_rate":
    tune.loguniform(...)}}. Integer ranges are inclusive; a grid search uses grid_search."""
    from ray import tune

    space: dict[str, dict[str, Any]] = {}
    for key, domain in search.space.items():
        method, setting = key.split(".", 1)
        low_high = domain.values
        if domain.kind == "choice":
            value = (tune.grid_search(low_high) if search.algorithm == "grid"
                     else tune.choice(low_high))
        elif domain.kind == "loguniform":
            value = tune.loguniform(*low_high)
        elif domain.kind == "uniform":
            value = tune.uniform(*low_high)
        elif domain.kind == "randint":
            value = tune.randint(low_high[0], low_high[1] + 1)
        else:
            value = tune.lograndint(low_high[0], low_high[1] + 1)
        space.setdefault(method, {})[setting] = value
    return space


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's nested config as '<method>.<setting>' -> value."""
    return {f"{m}.{k}": v for m, part in config.items() if isinstance(part, dict)
            for k, v in part.items()}


def scored_methods(spec: JobSpec) -> list[str]:
    """The unlearning methods a search runs and scores."""
    assert spec.search is not None
    return spec.search.objective.methods or [
        m for m in UNLEARNING_METHODS if m in spec.methods.enabled()]


def trial_settings(spec: JobSpec, config: dict[str, Any]) -> dict[str, UnlearnSpec]:
    """Each scored method's settings: the job's, with the trial's values put in."""
    out = {}
    for method in scored_methods(spec):
        base: UnlearnSpec = getattr(spec.methods, method)
        update = {k: plain_value(v) for k, v in (config.get(method) or {}).items()}
        out[method] = UnlearnSpec.model_validate({**base.model_dump(), **update})
    return out


def plain_value(value: Any) -> Any:
    """NumPy scalars (from samplers) as Python values."""
    return value.item() if isinstance(value, np.generic) else value


def job_with(spec: JobSpec, config: dict[str, Any], name: str | None = None,
             ground_truth: GroundTruthSpec | None = None) -> JobSpec:
    """The job a trial's settings make: the scored methods' settings replaced, no search.

    With `ground_truth`, the job's `ldo` is replaced by that earlier result (the search's
    leave-dataset-out, computed once), so the job does not retrain.
    """
    out = spec.model_copy(deep=True)
    for method, settings in trial_settings(spec, config).items():
        setattr(out.methods, method, settings)
    out.search = None
    if name:
        out.name = name
    if ground_truth is not None and out.methods.ldo is not None:
        out.methods.ldo = None
        out.ground_truth = ground_truth
    if out.methods.lds is not None and not out.methods.estimates():
        out.methods.lds = None  # nothing left to score by it
    return JobSpec.model_validate(out.model_dump())


# ------------------------------------------------------------------ the objective


def load_objective(target: str) -> Callable[[pd.DataFrame, pd.DataFrame | None], float]:
    """A user metric from 'package.module:function' or '/path/file.py:function'."""
    where, name = target.split(":")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise SearchError(f"search.objective.function: no file {where}")
            module_spec = importlib.util.spec_from_file_location(
                f"untrac_user_metric_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except SearchError:
        raise
    except Exception as err:  # noqa: BLE001
        raise SearchError(f"search.objective.function: cannot import {where}: "
                          f"{type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SearchError(f"search.objective.function: {where} has no function {name!r}")
    return fn


def objective_of(table: pd.DataFrame, truth: pd.DataFrame | None, spec: JobSpec,
                 metric_fn: Callable | None = None, lds_subsets: pd.DataFrame | None = None,
                 train: list[str] | None = None) -> tuple[float, dict[str, float]]:
    """The objective of one evaluation round: per method (its cells at one point), and their
    mean (NaN when every method's is NaN). Metric lds scores against `lds_subsets` (the
    search's retrained subsets, results/lds.py; `train`: the training sets)."""
    objective = spec.search.objective
    per_method: dict[str, float] = {}
    if metric_fn is None:
        score, where = _SCORE_FIELD[objective.metric]
        lds = score == "lds"
        test = list(dict.fromkeys(table["test_set"]))
        train = train or list(dict.fromkeys(table["train_set"]))
        scores = score_frame(table, train, test, groups=spec.data.test_groups(),
                             truth=None if lds else truth, subsets=lds_subsets if lds else None,
                             intervals=False)
        per_method = latest_values(scores, score, where)
    else:
        for method, part in table.groupby("method"):
            per_method[str(method)] = float(metric_fn(part.reset_index(drop=True), truth))
    values = np.array(list(per_method.values()), dtype=float)
    value = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return value, per_method


def better(a: float, b: float, mode: str) -> bool:
    """True when a beats b (NaN never beats anything; anything beats NaN)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if mode == "max" else a < b


