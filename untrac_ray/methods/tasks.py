"""The tasks every method is made of. Each runs on a bench (a `Bench`: workbench.Workbench, plain
PyTorch, no Ray) from one of the shared weight sets, and returns losses (or a few other
numbers) for the driver to assemble, as a TaskResult.

- EvalTask: base losses.                          - UnlearnTask: UnTrac / UnTrac-Inv.
- LdoTask: retrain without one training set.      - GradientTask: GradDot, GradCos, TracIn.
- SubsetTask: retrain on a subset of them (LDS).  - EkfacTask: influence functions (kronfluence).

Two optional parts of a task, for results too big for the driver: `payload_in_store` (true:
the engine keeps its payload in Ray's object store and hands the driver a reference) and
`needs()` (tasks whose payloads it reads: the engine runs them first and `run` gets their
payloads after the bench, in order). `needs_of` reads the second for any task.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from untrac_ray.compute.unlearning import check_eval_losses, unlearn
from untrac_ray.inputs.spec_methods import EkfacSpec, UnlearnSpec
from untrac_ray.inputs.spec_sections import TrainingSpec
from untrac_ray.inputs.tokenization import TokenizedSet

BASE = "base"
# A task field added after results were stored: it is in a task's key (results/task_store.py)
# only when it differs from its default, so that tasks stored before keep their keys.
KEYED_WHEN_SET = "keyed_when_set"


class Bench(Protocol):
    """What a task uses of the bench it runs on (workbench.Workbench; in a gang, each rank's
    engine/sharded.ShardedWorkbench): the model, the datasets and each one's evaluation rows,
    the device, the precision, and the rank of the process."""

    model: torch.nn.Module
    datasets: dict[str, TokenizedSet]
    eval_indices: dict[str, np.ndarray]
    device: torch.device
    precision: str
    rank: int  # in a gang of processes sharing one sharded model; 0 alone

    def reset(self, weights: str = BASE) -> None:
        """Load the named shared weight set into the model."""

    def evaluate(
        self, names: tuple[str, ...], per_row: bool = False
    ) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
        """Mean loss on each named dataset's evaluation rows (and, with per_row, each row's)."""


def init_weights_name(seed: int) -> str:
    """Name of the weight set that leave-dataset-out training with `seed` starts from."""
    return f"init/{seed}"


@dataclass
class Output:
    """What a task measured: losses[step][dataset], per-row losses, or another payload."""

    losses: dict[int, dict[str, float]]
    row_losses: dict[str, np.ndarray] | None = None
    payload: Any = None


@dataclass(frozen=True)
class EvalTask:
    """Evaluate the unmodified model on some datasets (the base losses)."""

    datasets: tuple[str, ...]
    per_row: bool = False

    def run(self, bench: Bench) -> Output:
        bench.reset(BASE)
        losses, rows = bench.evaluate(self.datasets, per_row=self.per_row)
        return Output({0: losses}, rows)


@dataclass(frozen=True)
class UnlearnTask:
    """Unlearn dataset `forget` and evaluate `evaluate` at the steps of its evaluation points.

    UnTrac forgets a training set and evaluates the test sets; UnTrac-Inv the other way round.
    `schedule[p - 1]` is the step of point p (schedule.eval_schedules). With per_row, each
    evaluated row's loss after the last step is returned too (drill-down).
    """

    method: str
    forget: str
    evaluate: tuple[str, ...]
    settings: UnlearnSpec
    schedule: tuple[int, ...]
    per_row: bool = False
    retain: tuple[str, ...] = ()  # the kept sets of the retain term (settings.retain_weight)

    def run(self, bench: Bench) -> Output:
        bench.reset(BASE)
        out = Output({})
        last = self.schedule[-1]
        stop = self._stopping_rule(bench)

        def record(step: int) -> None:
            final = step == last or stop is not None  # a stopped run has one point: its last
            losses, rows = bench.evaluate(self.evaluate, per_row=self.per_row and final)
            check_eval_losses(losses, self.forget, step)
            out.losses[last if stop is not None else step] = losses
            if rows is not None:
                out.row_losses = rows

        taken = unlearn(bench.model, bench.datasets[self.forget], self.settings, self.schedule,
                        record, bench.device, [bench.datasets[n] for n in self.retain], stop,
                        rank=bench.rank)
        if stop is not None:
            out.payload = {"stopped_at": taken}
        return out

    def _stopping_rule(self, bench: Bench) -> Callable[[int], bool] | None:
        """settings.stop_loss_rise as a test after a step: has the unlearned set's loss (on its
        evaluation rows) risen that much above the base model's?"""
        rise = self.settings.stop_loss_rise
        if rise is None:
            return None
        start = bench.evaluate((self.forget,))[0][self.forget]
        every = self.settings.stop_check_every

        def reached(step: int) -> bool:
            if step % every:
                return False
            now = bench.evaluate((self.forget,))[0][self.forget]
            return now - start >= rise

        return reached


def _steps_field() -> Any:
    """A retraining's optimizer steps: None, training's own (epochs over the rows it keeps, or
    max_steps); a number (methods.ldo.steps / lds.steps `same`), exactly that many steps."""
    return field(default=None, metadata={KEYED_WHEN_SET: True})


@dataclass(frozen=True)
class LdoTask:
    """Train from the initial weights on `train` minus `left_out` (None: all of them) with the
    base model's schedule and `seed` (for `steps` optimizer steps when given), then evaluate
    `evaluate`."""

    left_out: str | None
    train: tuple[str, ...]
    evaluate: tuple[str, ...]
    training: TrainingSpec
    seed: int
    steps: int | None = _steps_field()

    def run(self, bench: Bench) -> Output:
        kept = tuple(n for n in self.train if n != self.left_out)
        return retrain(bench, kept, self.evaluate, self.training, self.seed, self.steps)


@dataclass(frozen=True)
class SubsetTask:
    """Train from the initial weights on the training sets in `kept` (subset number `subset`
    of the linear datamodeling score: plans.plan_lds, results/lds.py) with the base model's
    schedule and `seed` (for `steps` optimizer steps when given), then evaluate `evaluate`."""

    subset: int
    kept: tuple[str, ...]
    evaluate: tuple[str, ...]
    training: TrainingSpec
    seed: int
    steps: int | None = _steps_field()

    def run(self, bench: Bench) -> Output:
        return retrain(bench, self.kept, self.evaluate, self.training, self.seed, self.steps)


def retrain(bench: Bench, kept: tuple[str, ...], evaluate: tuple[str, ...],
            training: TrainingSpec, seed: int, steps: int | None = None) -> Output:
    """Train the initial weights of `seed` on the `kept` sets as the base model was trained
    (same schedule, that seed; `steps`: that many optimizer steps, the learning-rate schedule
    spread over them), and evaluate `evaluate`: LDO's and LDS's retraining. The payload
    says how many steps it took ({"steps": n})."""
    from untrac_ray.compute.training import train_model

    bench.reset(init_weights_name(seed))
    update: dict[str, Any] = {"seed": seed}
    if steps is not None:
        update["max_steps"] = steps
    cfg = training.model_copy(update=update)
    taken = train_model(bench.model, [bench.datasets[n] for n in kept], cfg, device=bench.device,
                        rank=bench.rank)
    losses, _ = bench.evaluate(evaluate)
    return Output({0: losses}, payload={"steps": len(taken)})


@dataclass(frozen=True)
class GradientTask:
    """The gradient of one dataset's loss at one weight set (base, or a checkpoint), or, given
    `tests`, only its dot products with those test sets' gradients at the same weights.

    Training sets use all their rows and their loss is aggregated as `reduction` says (the
    spec's aggregate: summed or mean token loss); test sets use the rows they are evaluated
    on and their mean token loss, the quantity UnTrac measures.

    A gradient is as long as the model, so it never goes to the driver: without `tests` the
    payload (the gradient, float32) stays in Ray's object store; with `tests` the task reads
    those sets' gradients from there (`needs`: computed once per weight set and test set) and
    returns only {(a, b): g_a . g_b} in float64 for (dataset, t), (dataset, dataset) and
    (t, t) for every test set t: what GradDot, GradCos and TracIn are made of.
    """

    weights: str
    dataset: str
    all_rows: bool
    batch_size: int
    reduction: str = "mean"
    tests: tuple[str, ...] = ()

    @property
    def payload_in_store(self) -> bool:
        return not self.tests

    def needs(self) -> tuple[GradientTask, ...]:
        """The gradient tasks of the test sets, at the same weights (evaluated rows, mean)."""
        return tuple(GradientTask(self.weights, t, False, self.batch_size) for t in self.tests)

    def run(self, bench: Bench, *test_gradients: np.ndarray) -> Output:
        from untrac_ray.compute.baselines import flat_gradient, gradient_products

        bench.reset(self.weights)
        data = bench.datasets[self.dataset]
        rows = np.arange(len(data)) if self.all_rows else bench.eval_indices[self.dataset]
        grad = flat_gradient(bench.model, data, rows, self.batch_size, bench.device,
                             reduction=self.reduction)
        if not self.tests:
            return Output({}, payload=grad.to("cpu").numpy())
        others = dict(zip(self.tests, test_gradients, strict=True))
        return Output({}, payload=gradient_products(self.dataset, grad, others))


@dataclass(frozen=True)
class EkfacTask:
    """EK-FAC influence of every training set on every test set, at the base weights.

    Under the bench's bf16 precision only the model's forward and backward passes run in
    bf16 (kronfluence's own autocast); its factors and scores stay float32 / float64.
    """

    train: tuple[str, ...]
    test: tuple[str, ...]
    settings: EkfacSpec
    seed: int = 0

    def run(self, bench: Bench) -> Output:
        from untrac_ray.compute.baselines import ekfac_influence
        from untrac_ray.compute.evaluation import sample_indices

        bench.reset(BASE)
        train = {
            n: (bench.datasets[n], sample_indices(len(bench.datasets[n]),
                                                  self.settings.max_train_examples, self.seed))
            for n in self.train
        }
        test = {n: (bench.datasets[n], bench.eval_indices[n]) for n in self.test}
        model = copy.deepcopy(bench.model)  # kronfluence wraps modules in place
        torch.manual_seed(self.seed)  # the true Fisher samples labels from the model
        return Output({}, payload=ekfac_influence(model, train, test, self.settings,
                                                  bench.device, precision=bench.precision))


Task = EvalTask | UnlearnTask | LdoTask | SubsetTask | GradientTask | EkfacTask


def needs_of(task: Task) -> tuple[Task, ...]:
    """The tasks whose payloads `task` reads (none for most kinds)."""
    needs = getattr(task, "needs", None)
    return needs() if needs is not None else ()


@dataclass
class TaskResult:
    """A task and what it measured: losses[step][dataset] (step 0: no unlearning), per-row
    losses for the drill-down, or a payload such as EK-FAC's scores (or, from an engine, a
    reference to a payload kept in the object store)."""

    task: Task
    losses: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    row_losses: dict[str, np.ndarray] | None = None
    payload: Any = None
    index: int = -1  # position in the list of tasks given to Engine.map
