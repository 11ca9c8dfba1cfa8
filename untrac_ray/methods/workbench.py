"""Where tasks run, in plain PyTorch: one model, the shared weight sets and the datasets.

The Ray actors in engine/actor.py each own one Workbench; tests and the benchmark's bare loop use
one directly. Nothing here knows Ray.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from untrac_ray.compute.evaluation import row_losses
from untrac_ray.compute.modeling import SharedWeights, load_arrays, weight_dtype
from untrac_ray.compute.precision import check_precision, precision_context
from untrac_ray.inputs.tokenization import TokenizedSet
from untrac_ray.methods.tasks import BASE, Output, Task, TaskResult

__all__ = ["Workbench"]


class Workbench:
    """One model plus the datasets, able to run any task from any shared weight set.

    `weights` maps names to SharedWeights ("base" is the model under study; others are the
    initial weights of leave-dataset-out retraining and training checkpoints). It may be lazy:
    the actor reads a set from Ray's object store the first time a task asks for it.
    `precision` ("fp32" or "bf16") is the numerics every task runs under (`run` enters
    precision.precision_context: bf16 autocast; the weights stay float32).
    """

    def __init__(
        self,
        weights: Mapping[str, SharedWeights],
        datasets: dict[str, TokenizedSet],
        eval_indices: dict[str, np.ndarray],
        eval_batch_size: int,
        device: torch.device | str = "cpu",
        *,
        precision: str = "fp32",
        weights_dtype: str = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.rank = 0  # one process: the Bench of a single-process run
        self.weights = weights
        # One copy of the model on the device, in the dtype asked for; resetting copies a
        # weight set in from the host arrays (zero-copy object-store memory on an actor)
        # rather than from a second, pristine device copy: 1x the weights, not 2x.
        self.model = weights[BASE].build(self.device, weight_dtype(weights_dtype))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        self.model.eval()
        self.datasets = datasets
        self.eval_indices = eval_indices
        self.eval_batch_size = eval_batch_size

    def reset(self, weights: str = BASE) -> None:
        """Load a shared weight set into the model."""
        load_arrays(self.model, self.weights[weights].arrays)
        self.model.zero_grad(set_to_none=True)
        self.model.eval()

    def evaluate(
        self, names: tuple[str, ...], per_row: bool = False
    ) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
        """Mean loss of the current model on each named dataset's evaluation rows (and, with
        per_row, each row's loss)."""
        means, rows = {}, {}
        for name in names:
            means[name], rows[name] = row_losses(
                self.model, self.datasets[name], self.eval_indices[name],
                self.eval_batch_size, self.device,
            )
        return means, (rows if per_row else None)

    def run(self, task: Task, inputs: Sequence[Any] = ()) -> TaskResult:
        """Run one task (it resets the model to the weight set it needs) in the bench's
        precision, and time it. `inputs` are the payloads of the tasks it needs
        (tasks.needs_of), in order."""
        start = time.perf_counter()
        with precision_context(self.device, self.precision):
            out: Output = task.run(self, *inputs)
        return TaskResult(task=task, losses=out.losses, seconds=time.perf_counter() - start,
                          row_losses=out.row_losses, payload=out.payload)
