"""Each method as tasks to run and a rule to turn their results into influence cells.

A `MethodPlan` holds a method's tasks and its `assemble` function; the runner pools the tasks
of all methods on the engine and hands each plan back its results. Every method yields rows of
the same tidy table (method, step, train_set, test_set, influence, loss_before, loss_after).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import KEPT_SEPARATOR, TrainingSpec
from untrac_ray.methods.cells import average_members, cell, influence_rows
from untrac_ray.methods.schedule import eval_schedules, headline_point
from untrac_ray.methods.tasks import (
    BASE,
    EkfacTask,
    GradientTask,
    LdoTask,
    SubsetTask,
    Task,
    TaskResult,
    UnlearnTask,
)

Assemble = Callable[[list[TaskResult], dict[str, float]], list[dict]]


@dataclass
class MethodPlan:
    """The tasks of one or more methods and how to turn their results into table rows."""

    methods: list[str]
    tasks: list[Task]
    assemble: Assemble
    extras: dict = field(default_factory=dict)  # side results (LDO per seed, drill-down)
    headline: dict[str, int] = field(default_factory=dict)  # method -> point scored, fixed


def plan_unlearning(spec: JobSpec, method: str, train: list[str], test: list[str],
                    n_rows: dict[str, int]) -> MethodPlan:
    """UnTrac: one task per training set; UnTrac-Inv: one per test set (with drill-down).

    Every trajectory is evaluated at the same points of its own schedule (schedule.py);
    n_rows gives each unlearned set's size, which sets its number of steps."""
    settings = spec.methods.enabled()[method]
    inverse = method == "untrac_inv"
    forget, evaluate = (test, train) if inverse else (train, test)
    schedules = eval_schedules(settings, {name: n_rows[name] for name in forget})
    try:
        headline = headline_point(settings, len(next(iter(schedules.values()))))
    except ValueError as err:
        raise SpecError(f"methods.{method}.{err}") from None
    kept = settings.retain_weight > 0 or settings.kl_weight > 0
    if kept and len(forget) < 2:
        term, does = (("retain_weight", "the retain term descends on") if settings.retain_weight
                      else ("kl_weight", "the KL term holds the base model's predictions on"))
        raise SpecError(f"methods.{method}.{term}: {does} the other "
                        f"{'test' if inverse else 'training'} sets, and there is only one")
    # an ensemble: the same unlearning under seeds seed, seed+1, ... (its cells averaged)
    members = [settings.model_copy(update={"seed": settings.seed + i})
               for i in range(settings.ensemble)]
    tasks = [UnlearnTask(method, name, tuple(evaluate), member, schedules[name],
                         per_row=inverse and i == 0,
                         retain=tuple(n for n in forget if n != name) if kept else ())
             for name in forget for i, member in enumerate(members)]

    plan = MethodPlan([method], tasks, lambda results, base: [], headline={method: headline})

    def assemble(results: list[TaskResult], base: dict[str, float]) -> list[dict]:
        by_seed: dict[int, list[dict]] = {}
        for r in results:
            by_seed.setdefault(r.task.settings.seed, []).extend(influence_rows(r, base))
        rows = [row for seed_rows in by_seed.values() for row in seed_rows]
        if len(members) == 1:
            return rows
        # each member's cells, for the ensemble's trust signal (how well its members agree)
        plan.extras.setdefault("members", {})[method] = list(by_seed.values())
        return average_members(rows)

    plan.assemble = assemble
    return plan


def retraining_steps(spec: JobSpec, mode: str, train: list[str],
                     n_rows: dict[str, int]) -> int | None:
    """The `steps` of every retraining task on some of the training sets (methods.ldo.steps
    or lds.steps `mode`): epochs, None (training's own: epochs over the rows it keeps, fewer
    steps than the full training's); same, the full training's optimizer steps."""
    return spec.training.total_steps(sum(n_rows[k] for k in train)) if mode == "same" else None


def steps_taken(result: TaskResult, training: TrainingSpec, n_rows: dict[str, int],
                kept: tuple[str, ...]) -> int:
    """The optimizer steps a retraining took, as it reported them (the payload of
    tasks.retrain); a result stored before it reported them: the steps it was planned for."""
    if isinstance(result.payload, dict) and "steps" in result.payload:
        return int(result.payload["steps"])
    task = result.task
    return task.steps if task.steps is not None else training.total_steps(
        sum(n_rows[k] for k in kept))


def plan_ldo(spec: JobSpec, train: list[str], test: list[str],
             n_rows: dict[str, int]) -> MethodPlan:
    """Leave-dataset-out: per seed, one training on all sets and one without each set, each
    for the steps methods.ldo.steps says (n_rows: each training set's rows). Per seed, the
    rows of extras["ldo_seeds"] record the optimizer steps of the full retraining
    (steps_full) and of the one without the set (steps)."""
    seeds = spec.methods.ldo.seeds or [spec.training.seed]
    steps = retraining_steps(spec, spec.methods.ldo.steps, train, n_rows)
    kept_of = {left_out: tuple(n for n in train if n != left_out) for left_out in [None, *train]}
    tasks = [LdoTask(left_out, tuple(train), tuple(test), spec.training, seed, steps)
             for seed in seeds for left_out in [None, *train]]
    plan = MethodPlan(["ldo"], tasks, lambda results, base: [])

    def assemble(results: list[TaskResult], base: dict[str, float]) -> list[dict]:
        per_seed = []
        for seed in seeds:
            mine = [r for r in results if r.task.seed == seed]
            ours = {r.task.left_out: r.losses[0] for r in mine}
            took = {r.task.left_out: steps_taken(r, spec.training, n_rows,
                                                 kept_of[r.task.left_out]) for r in mine}
            for k in train:
                for j in test:
                    per_seed.append({"seed": seed, "train_set": k, "test_set": j,
                                     "loss_full": ours[None][j], "loss_without": ours[k][j],
                                     "steps_full": took[None], "steps": took[k]})
        plan.extras["ldo_seeds"] = per_seed
        rows = []
        for k in train:
            for j in test:
                cells = [c for c in per_seed if c["train_set"] == k and c["test_set"] == j]
                full = np.mean([c["loss_full"] for c in cells])
                without = np.mean([c["loss_without"] for c in cells])
                rows.append(cell("ldo", k, j, without - full, full, without))
        return rows

    plan.assemble = assemble
    return plan


def subset_size(n_train: int, keep: float) -> int:
    """How many training sets every LDS subset keeps: round(keep x K), half up, and at least
    one set kept and one left out."""
    return min(max(int(math.floor(keep * n_train + 0.5)), 1), n_train - 1)


def draw_subsets(train: list[str], n: int, keep: float, seed: int) -> list[tuple[str, ...]]:
    """`n` distinct random subsets of the training sets for the linear datamodeling score,
    each of exactly subset_size(K, keep) sets, as datamodels draw them: with subsets of one
    size, a prediction cannot score by counting the sets left out (results/scores.py). With
    few sets there are fewer than n (all C(K, m) of them, in a seeded order). Sets keep the
    spec's order in each subset."""
    rng = np.random.default_rng([seed, 7])
    m = subset_size(len(train), keep)
    possible = math.comb(len(train), m)
    if possible <= n:
        every = list(itertools.combinations(range(len(train)), m))
        picked = [every[i] for i in rng.permutation(len(every))]
    else:
        picked, seen = [], set()
        while len(picked) < n:
            draw = tuple(sorted(rng.choice(len(train), size=m, replace=False).tolist()))
            if draw not in seen:
                seen.add(draw)
                picked.append(draw)
    return [tuple(train[i] for i in sorted(idx)) for idx in picked]


def plan_lds(spec: JobSpec, train: list[str], test: list[str],
             n_rows: dict[str, int]) -> MethodPlan:
    """The linear datamodeling score's ground truth: every subset retrained with every seed,
    and the first `noise_subsets` once more with the noise seed, each for the steps
    methods.lds.steps says. Its rows (one per subset, seed and test set: the retrained
    model's loss and its optimizer steps) go to extras["lds_subsets"]; it has no cells of its
    own (results/lds.py scores every method's cells against them)."""
    lds = spec.methods.lds
    subsets = draw_subsets(train, lds.subsets, lds.keep, lds.sample_seed)
    if len(subsets) < 4:
        raise SpecError(f"methods.lds: {len(train)} training sets make only {len(subsets)} "
                        f"distinct subsets of {subset_size(len(train), lds.keep)} sets; the "
                        "score needs at least 4 (4 or more training sets)")
    seeds = spec.methods.lds_seeds(spec.training.seed)
    noise = spec.methods.lds_noise_seed(spec.training.seed)
    steps = retraining_steps(spec, lds.steps, train, n_rows)
    tasks = [SubsetTask(i, kept, tuple(test), spec.training, seed, steps)
             for seed in seeds for i, kept in enumerate(subsets)]
    tasks += [SubsetTask(i, subsets[i], tuple(test), spec.training, noise, steps)
              for i in range(min(lds.noise_subsets, len(subsets)))]
    plan = MethodPlan(["lds"], tasks, lambda results, base: [])

    def assemble(results: list[TaskResult], base: dict[str, float]) -> list[dict]:
        plan.extras["lds_subsets"] = [
            {"subset": r.task.subset, "seed": r.task.seed,
             "role": "noise" if r.task.seed == noise and noise not in seeds else "truth",
             "kept": KEPT_SEPARATOR.join(r.task.kept), "test_set": j,
             "loss": float(r.losses[0][j]), "steps": steps_taken(r, spec.training, n_rows,
                                                                  r.task.kept)}
            for r in results for j in test]
        return []

    plan.assemble = assemble
    return plan


def plan_gradients(
    spec: JobSpec, train: list[str], test: list[str], checkpoints: list[dict]
) -> MethodPlan:
    """GradDot and GradCos at the base weights, TracIn summed over the training checkpoints
    (weighted by their learning rates). Training sets' gradients follow each method's
    `aggregate` (GradCos: scale-free, so either).

    One task per (weights, training set): it computes the set's gradient on an actor and
    returns only its dot products with the test sets' gradients at the same weights (and the
    squared norms), which the engine computes first, once each, and keeps in Ray's object
    store (GradientTask.needs). No gradient is sent to the driver or stored with the run.
    """
    enabled = spec.methods.enabled()
    methods = [m for m in ("graddot", "gradcos", "tracin") if m in enabled]
    batch = max(enabled[m].batch_size for m in methods)
    reduction: dict[str, str] = {}  # weight set -> how training sets' losses are aggregated
    if "graddot" in enabled or "gradcos" in enabled:
        reduction[BASE] = (enabled.get("graddot") or enabled["gradcos"]).aggregate
    if "tracin" in enabled:
        reduction.update({f"ckpt/{c['step']}": enabled["tracin"].aggregate for c in checkpoints})
    weight_sets = list(reduction)
    tasks = [GradientTask(w, k, True, batch, reduction[w], tests=tuple(test))
             for w in weight_sets for k in train]
    lr = {f"ckpt/{c['step']}": c["learning_rate"] for c in checkpoints}

    def assemble(results: list[TaskResult], base: dict[str, float]) -> list[dict]:
        # (weights, a, b) -> g_a . g_b at those weights (GradientTask's payload)
        gram = {(r.task.weights, *pair): v for r in results for pair, v in r.payload.items()}
        rows = []
        for k in train:
            for j in test:
                if BASE in weight_sets:
                    dot = gram[BASE, k, j]
                    norms = math.sqrt(gram[BASE, k, k]) * math.sqrt(gram[BASE, j, j])
                    if "graddot" in enabled:
                        rows.append(cell("graddot", k, j, dot))
                    if "gradcos" in enabled:
                        rows.append(cell("gradcos", k, j, dot / norms if norms else 0.0))
                if "tracin" in enabled:
                    total = sum(lr[w] * gram[w, k, j] for w in weight_sets if w != BASE)
                    rows.append(cell("tracin", k, j, total))
        return rows

    return MethodPlan(methods, tasks, assemble)


def plan_ekfac(spec: JobSpec, train: list[str], test: list[str]) -> MethodPlan:
    """Influence functions with EK-FAC: one task (factors are fitted once over all sets)."""
    task = EkfacTask(tuple(train), tuple(test), spec.methods.ekfac, spec.evaluation.seed)

    def assemble(results: list[TaskResult], base: dict[str, float]) -> list[dict]:
        scores = results[0].payload
        return [cell("ekfac", k, j, scores[(k, j)]) for k in train for j in test]

    return MethodPlan(["ekfac"], [task], assemble)


def plan_methods(
    spec: JobSpec, train: list[str], test: list[str], checkpoints: list[dict],
    n_rows: dict[str, int],
) -> list[MethodPlan]:
    """The plans of every method the spec asks for, the costliest first (n_rows: the size
    of every dataset, which sets the length of its unlearning trajectory)."""
    enabled = spec.methods.enabled()
    plans = []
    if "ldo" in enabled:
        plans.append(plan_ldo(spec, train, test, n_rows))
    if "lds" in enabled:
        plans.append(plan_lds(spec, train, test, n_rows))
    if "ekfac" in enabled:
        plans.append(plan_ekfac(spec, train, test))
    if {"graddot", "gradcos", "tracin"} & set(enabled):
        plans.append(plan_gradients(spec, train, test, checkpoints))
    for method in ("untrac", "untrac_inv"):
        if method in enabled:
            plans.append(plan_unlearning(spec, method, train, test, n_rows))
    return plans
