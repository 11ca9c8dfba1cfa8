"""One Tune trial of a search: the trial's unlearning settings run on every set, one
evaluation point (a round) at a time, in segments (methods/segments.py), its objective reported
to Tune after each round so that a scheduler such as ASHA can stop it early. A trial with one
actor runs its workbench in its own process (reused by later trials of that process); with
more, it starts an engine inside its placement group.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray

from untrac_ray.engine.pool import Engine
from untrac_ray.inputs.errors import UntracError
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.cells import unlearning_cells
from untrac_ray.methods.schedule import eval_schedules
from untrac_ray.methods.segments import SegmentTask
from untrac_ray.methods.tasks import BASE, TaskResult
from untrac_ray.results.tables import influence_table
from untrac_ray.search.space import (
    CELL_FIELDS,
    OBJECTIVE,
    better,
    load_objective,
    objective_of,
    trial_settings,
)


@dataclass
class TrialContext:
    """What every trial receives (through tune.with_parameters): the job, references to the
    weights and tokenized tables in the object store (put once by the driver), the base
    losses and the ground truth (computed once by the driver)."""

    spec: JobSpec
    weights: dict[str, ray.ObjectRef]
    tables: dict[str, ray.ObjectRef]
    pad_id: int
    eval_indices: dict[str, np.ndarray]
    n_rows: dict[str, int]
    train: list[str]
    test: list[str]
    base_losses: dict[str, float]
    truth: pd.DataFrame | None
    lds_subsets: pd.DataFrame | None = None  # the LDS's retrained subsets (objective lds)


@dataclass
class _Trajectory:
    method: str
    forget: str
    evaluate: tuple[str, ...]
    settings: UnlearnSpec
    steps: tuple[int, ...]  # the step of each evaluation point (methods/schedule.py)


def _trajectories(ctx: TrialContext, settings: dict[str, UnlearnSpec]) -> list[_Trajectory]:
    out = []
    for method, s in settings.items():
        forget, evaluate = (ctx.test, ctx.train) if method == "untrac_inv" else (
            ctx.train, ctx.test)
        schedules = eval_schedules(s, {name: ctx.n_rows[name] for name in forget})
        for name in forget:
            out.append(_Trajectory(method, name, tuple(evaluate), s, schedules[name]))
    return out


def _gather(refs: list[ray.ObjectRef]) -> list[TaskResult]:
    """Results of tasks on actors; an UntracError raised in one (a NaN loss) is raised here."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as err:
        if isinstance(err.cause, UntracError):
            raise type(err.cause)(str(err.cause)) from None
        raise UntracError(f"a trial task failed: {err.cause!r}") from None
    except RayActorError as err:
        raise UntracError(f"a trial's actor died ({str(err).splitlines()[0]})") from None


def _pg_options() -> dict[str, Any]:
    """Actor options that keep a trial's actors inside the trial's placement group."""
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    if pg is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_capture_child_tasks=True)}


_LOCAL: dict[str, Any] = {}  # the workbench of this trial process, reused by later trials


def _local_bench(ctx: TrialContext):
    """A Workbench in this (trial) process, built once per process from the shared weights
    (Tune reuses the process for later trials); trajectories of earlier trials dropped."""
    import torch

    from untrac_ray.compute.memory import return_freed_memory
    from untrac_ray.compute.precision import configure_tf32
    from untrac_ray.engine.actor import workbench_from_refs
    from untrac_ray.methods.segments import forget_state

    key = ctx.weights[BASE].hex()
    if _LOCAL.get("key") != key:
        res = ctx.spec.resources
        torch.set_num_threads(max(1, int(res.cpus_per_actor)))
        return_freed_memory()
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        configure_tf32(res.tf32, device)
        bench = workbench_from_refs({"weights": ctx.weights, "datasets": ctx.tables},
                                    ctx.pad_id, ctx.eval_indices,
                                    ctx.spec.evaluation.batch_size, device, res.precision,
                                    res.weights_dtype, res.gradient_checkpointing)
        _LOCAL.clear()
        _LOCAL.update(key=key, bench=bench)
    bench = _LOCAL["bench"]
    forget_state(bench)
    return bench


def trial_resources(spec: JobSpec):
    """A trial's placement group: one actor runs in the trial's own process (its bundle holds
    the actor's CPUs and GPUs); several are actors in bundles of their own."""
    from ray import tune

    r, n = spec.resources, spec.search.actors_per_trial
    bundle = {"CPU": r.cpus_per_actor, "GPU": r.gpus_per_actor}
    return tune.PlacementGroupFactory([bundle] if n == 1 else [{}] + [bundle] * n)


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: unlearn every set with the trial's settings, one evaluation point at a
    time on all of them (each set at its own step for the point), and report the objective
    after each point (a round)."""
    from ray import tune

    started = time.time()
    trial_id = tune.get_context().get_trial_id() or "trial"
    spec = ctx.spec
    settings = trial_settings(spec, config)
    paths = _trajectories(ctx, settings)
    rounds = max(len(p.steps) for p in paths)  # a method's trajectories share its points
    metric_fn = load_objective(spec.search.objective.function) if (
        spec.search.objective.function) else None
    mode = spec.search.objective.mode
    best = float("nan")
    latest: dict[int, list[dict]] = {}  # trajectory -> its cells at its latest point
    with contextlib.ExitStack() as stack:
        if spec.search.actors_per_trial == 1:
            bench = _local_bench(ctx)

            def run(pairs: list[tuple[int, SegmentTask]]) -> list[TaskResult]:
                return [bench.run(t) for _, t in pairs]
        else:
            resources = spec.resources.model_copy(
                update={"num_actors": spec.search.actors_per_trial})
            engine = stack.enter_context(Engine(
                resources, ctx.weights, ctx.tables, ctx.pad_id, ctx.eval_indices,
                spec.evaluation.batch_size, max_useful_actors=len(paths),
                actor_options=_pg_options()))

            def run(pairs: list[tuple[int, SegmentTask]]) -> list[TaskResult]:
                # A trajectory stays on one actor, where its state is kept between rounds.
                return _gather([engine.submit(i % engine.size, t) for i, t in pairs])

        for r in range(rounds):
            pairs = [(i, SegmentTask(f"{trial_id}/{i}", p.method, p.forget, p.evaluate,
                                     p.settings, p.steps[r], last=r == len(p.steps) - 1))
                     for i, p in enumerate(paths) if r < len(p.steps)]
            new_rows: list[dict] = []
            seconds = 0.0
            for (i, _), result in zip(pairs, run(pairs), strict=True):
                p = paths[i]
                (step, losses), = result.losses.items()
                latest[i] = unlearning_cells(p.method, p.forget, r + 1, step, losses,
                                             ctx.base_losses)
                new_rows += latest[i]
                seconds += result.seconds
            # each method at its latest point (a method with fewer points keeps its last)
            table = influence_table([c for cells in latest.values() for c in cells],
                                    ctx.train, ctx.test)
            now, per_method = objective_of(table, ctx.truth, spec, metric_fn, ctx.lds_subsets,
                                           ctx.train)
            best = now if better(now, best, mode) or r == 0 else best
            value = best if spec.search.objective.step == "best" else now
            tune.report({
                OBJECTIVE: value, "objective_now": now, "round": r + 1,
                "rounds": rounds, "tasks": len(pairs), "compute_seconds": seconds,
                "trial_started": started,
                **{f"objective_{m}": v for m, v in per_method.items()},
                "cells": json.dumps([[c[k] for k in CELL_FIELDS] for c in new_rows]),
            })
