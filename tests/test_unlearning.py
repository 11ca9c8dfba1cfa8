"""The unlearning loop and the Workbench, in plain PyTorch (no Ray)."""

from __future__ import annotations

import pytest

from untrac_ray.inputs.errors import NonFiniteLossError
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.schedule import eval_schedules
from untrac_ray.methods.tasks import EvalTask, UnlearnTask
from untrac_ray.methods.workbench import Workbench


@pytest.fixture
def bench(bench_parts) -> Workbench:
    weights, sets, indices = bench_parts
    return Workbench({"base": weights}, sets, indices, eval_batch_size=16)


def _task(bench: Workbench, forget: str, evaluate: tuple[str, ...], settings) -> UnlearnTask:
    """An UnTrac task on one set alone, evaluated at its settings' own points."""
    schedule = eval_schedules(settings, {forget: len(bench.datasets[forget])})[forget]
    return UnlearnTask("untrac", forget, evaluate, settings, schedule)


def test_gradient_ascent_raises_the_loss_of_the_unlearned_set(bench):
    before = bench.run(EvalTask(("add_one",))).losses[0]["add_one"]
    settings = UnlearnSpec(optimizer="adam", learning_rate=1e-3, batch_size=8, eval_every=1)
    after = bench.run(_task(bench, "add_one", ("add_one",), settings)).losses
    assert sorted(after) == [1, 2, 3]
    trajectory = [after[s]["add_one"] for s in (1, 2, 3)]
    assert before < trajectory[0] < trajectory[1] < trajectory[2]


def test_reset_restores_the_base_weights_between_tasks(bench):
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.5, batch_size=8)
    first = bench.run(_task(bench, "add_one", ("next_number",), settings)).losses
    bench.run(_task(bench, "spell", ("next_number",), settings))
    again = bench.run(_task(bench, "add_one", ("next_number",), settings)).losses
    assert first == again
    base = bench.run(EvalTask(("next_number",))).losses[0]
    assert base["next_number"] != first[3]["next_number"]


def test_a_loss_that_turns_nan_names_the_dataset_and_step(bench):
    settings = UnlearnSpec(optimizer="sgd", learning_rate=1e30, batch_size=8)
    with pytest.raises(NonFiniteLossError, match=r"dataset 'spell'.* step \d"):
        bench.run(_task(bench, "spell", ("next_number",), settings))
