"""The unit of work of every method, in plain PyTorch: reset the model, unlearn, evaluate.

A `Workbench` holds one model, its pristine weights and the tokenized datasets. The Ray actors
in engine.py each own one; the benchmark's bare loop uses one directly. Nothing here knows Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from untrac_ray.errors import NonFiniteLossError
from untrac_ray.evaluation import mean_loss
from untrac_ray.modeling import SharedWeights, load_arrays
from untrac_ray.spec import UnlearnSpec
from untrac_ray.tokenization import TokenizedSet
from untrac_ray.unlearning import unlearn


@dataclass(frozen=True)
class EvalTask:
    """Evaluate the unmodified model on some datasets (the base losses)."""

    datasets: tuple[str, ...]

    def run(self, bench: Workbench) -> dict[int, dict[str, float]]:
        return {0: bench.evaluate(self.datasets)}


@dataclass(frozen=True)
class UnlearnTask:
    """Unlearn dataset `forget` and evaluate `evaluate` at each of the settings' eval steps.

    UnTrac forgets a training set and evaluates the test sets; UnTrac-Inv the other way round.
    """

    method: str
    forget: str
    evaluate: tuple[str, ...]
    settings: UnlearnSpec

    def run(self, bench: Workbench) -> dict[int, dict[str, float]]:
        losses: dict[int, dict[str, float]] = {}

        def record(step: int) -> None:
            at_step = bench.evaluate(self.evaluate)
            bad = [name for name, value in at_step.items() if not math.isfinite(value)]
            if bad:
                raise NonFiniteLossError(
                    f"loss on {', '.join(bad)} became non-finite while unlearning dataset "
                    f"{self.forget!r} at step {step}; lower the learning rate or set "
                    "max_grad_norm"
                )
            losses[step] = at_step

        unlearn(bench.model, bench.datasets[self.forget], self.settings, record, bench.device)
        return losses


Task = EvalTask | UnlearnTask


@dataclass
class TaskResult:
    """Losses a task measured: step -> dataset -> mean loss (step 0 for base losses)."""

    task: Task
    losses: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""


class Workbench:
    """One model plus the datasets, able to run any task from the shared weights."""

    def __init__(
        self,
        weights: SharedWeights,
        datasets: dict[str, TokenizedSet],
        eval_indices: dict[str, np.ndarray],
        eval_batch_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = weights.build(self.device)
        self.model.eval()
        # Keep a pristine copy on the device: resetting is a copy_, not a reload.
        self.pristine = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.datasets = datasets
        self.eval_indices = eval_indices
        self.eval_batch_size = eval_batch_size

    def reset(self) -> None:
        """Put the shared base weights back into the model."""
        load_arrays(self.model, self.pristine)
        self.model.zero_grad(set_to_none=True)

    def evaluate(self, names: tuple[str, ...]) -> dict[str, float]:
        """Mean loss of the current model on each named dataset's evaluation rows."""
        return {
            name: mean_loss(
                self.model, self.datasets[name], self.eval_indices[name],
                self.eval_batch_size, self.device,
            )
            for name in names
        }

    def run(self, task: Task) -> TaskResult:
        """Run one task from the base weights and return its losses."""
        start = time.perf_counter()
        self.reset()
        losses = task.run(self)
        return TaskResult(task=task, losses=losses, seconds=time.perf_counter() - start)
