"""The unlearning loop and the Workbench, in plain PyTorch (no Ray)."""

from __future__ import annotations

import pytest

from untrac_ray.errors import NonFiniteLossError
from untrac_ray.evaluation import sample_indices
from untrac_ray.job_setup import prepare_data
from untrac_ray.modeling import SharedWeights, build_model, config_from_dict
from untrac_ray.schedule import eval_schedules
from untrac_ray.spec import UnlearnSpec, load_spec
from untrac_ray.tasks import EvalTask, UnlearnTask
from untrac_ray.workbench import Workbench


@pytest.fixture
def bench(make_job) -> Workbench:
    spec = load_spec(make_job())
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    weights = SharedWeights.from_model(build_model(config, seed=0))
    sets = {name: data.tokenized(name) for name in data.tables}
    indices = {name: sample_indices(len(s), None, 0) for name, s in sets.items()}
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
