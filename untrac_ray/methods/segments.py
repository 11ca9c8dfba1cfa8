"""Unlearning in segments: one UnTrac / UnTrac-Inv trajectory advanced from one evaluation
step to the next, so that a search can score every trial as it goes and early stopping saves
real compute.

A `SegmentTask` continues the trajectory of one (method, forgotten set) up to step `until`,
evaluates there and returns the losses, like one step of `UnlearnTask`'s record. Between calls
the trajectory's state (parameters, optimizer state, batch order, torch RNG) stays on the
worker that ran it, in CPU memory, keyed by the task's `key`; resetting to the base weights is
what the next task does anyway. The state is a cache, not a requirement: a worker without it
(a restarted actor, another actor) recomputes the trajectory from the base weights, which
gives the same numbers. The sequence of operations is that of `unlearning.unlearn`, so a
trajectory run in segments equals one run in a single `UnlearnTask`.

Keeping the state costs memory (parameters and optimizer state per trajectory on the worker);
recomputing every prefix instead would cost O(rounds^2) steps, which would defeat early
stopping. Search proxies are small by design, so the memory is the cheaper side.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from untrac_ray.compute.optim import batch_schedule, make_optimizer, seed_dropout
from untrac_ray.compute.unlearning import ascent_step, check_ascent_loss, check_eval_losses
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.tasks import BASE, Bench, Output

# Trajectory states by workbench (one per actor), then by task key.
_STATES: weakref.WeakKeyDictionary[Any, dict[str, _Trajectory]] = weakref.WeakKeyDictionary()


@dataclass
class _Trajectory:
    """Where one trajectory stands between segments."""

    step: int
    optimizer: torch.optim.Optimizer
    schedule: Iterator[np.ndarray]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for name, value in state.items():
            if torch.is_tensor(value) and value.device != device:
                state[name] = value.to(device)


def _start(bench: Bench, settings: UnlearnSpec, n_rows: int) -> _Trajectory:
    """A new trajectory from the base weights, seeded as `unlearn` seeds one."""
    bench.reset(BASE)
    seed_dropout(settings.seed)
    optimizer = make_optimizer(settings.optimizer, bench.model.parameters(),
                               settings.learning_rate, seed=settings.seed)
    total = settings.total_steps(n_rows)
    schedule = batch_schedule(n_rows, settings.batch_size, total, settings.seed)
    return _Trajectory(0, optimizer, schedule)


def _resume(bench: Bench, state: _Trajectory) -> None:
    """Put a saved trajectory back into the workbench's model."""
    with torch.no_grad():
        for name, p in bench.model.named_parameters():
            p.copy_(state.params[name])
    bench.model.zero_grad(set_to_none=True)
    _optimizer_to(state.optimizer, bench.device)
    torch.set_rng_state(state.rng)
    if state.cuda_rng is not None:
        torch.cuda.set_rng_state(state.cuda_rng, bench.device)


def _save(bench: Bench, state: _Trajectory) -> None:
    """Keep a trajectory in CPU memory until its next segment."""
    state.params = {n: p.detach().to("cpu", copy=True) for n, p in bench.model.named_parameters()}
    _optimizer_to(state.optimizer, torch.device("cpu"))
    state.rng = torch.get_rng_state()
    if bench.device.type == "cuda":
        state.cuda_rng = torch.cuda.get_rng_state(bench.device)


@dataclass(frozen=True)
class SegmentTask:
    """Continue unlearning `forget` up to step `until` (an evaluation step of `settings`) and
    evaluate `evaluate` there. `last` drops the kept state afterwards."""

    key: str
    method: str
    forget: str
    evaluate: tuple[str, ...]
    settings: UnlearnSpec
    until: int
    last: bool = False

    def run(self, bench: Bench) -> Output:
        states = _STATES.setdefault(bench, {})
        data = bench.datasets[self.forget]
        state = states.pop(self.key, None)
        if state is None or state.step > self.until:
            state = _start(bench, self.settings, len(data))  # nothing kept: from the base
        else:
            _resume(bench, state)
        bench.model.train()
        while state.step < self.until:
            rows = next(state.schedule, None)
            if rows is None:
                break
            state.step += 1
            loss = ascent_step(bench.model, state.optimizer, data, rows,
                               self.settings.micro_batch_size, self.settings.max_grad_norm,
                               bench.device)
            check_ascent_loss(loss, self.forget, state.step)
        losses, _ = bench.evaluate(self.evaluate)
        check_eval_losses(losses, self.forget, state.step)
        bench.model.eval()
        if not self.last:
            _save(bench, state)
            states[self.key] = state
        return Output({state.step: losses})


def forget_state(bench: Bench, prefix: str = "") -> int:
    """Drop the kept trajectories whose key starts with prefix; returns how many."""
    states = _STATES.get(bench, {})
    gone = [k for k in states if k.startswith(prefix)]
    for k in gone:
        del states[k]
    return len(gone)
