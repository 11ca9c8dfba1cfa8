"""GradDot, GradCos and TracIn without shipping gradients: on a real local Ray, the test sets'
gradients stay in the object store, each training set's task returns a few dot products, and
the cells equal the direct single-process formula (each gradient in full, then dot products).
A task whose inputs were lost computes them again and runs again."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
from ray import cloudpickle
from ray.exceptions import ObjectLostError

from untrac_ray.compute.baselines import dataset_gradient
from untrac_ray.compute.evaluation import sample_indices
from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
from untrac_ray.engine.pool import LOST_INPUTS, Engine
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_sections import ResourcesSpec
from untrac_ray.methods.plans import plan_gradients
from untrac_ray.methods.tasks import BASE, GradientTask
from untrac_ray.results.task_store import encode
from untrac_ray.run.job_setup import prepare_data

# The tasks below are defined in this test module: ship them to the workers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRAIN, TEST = ["add_one", "double", "spell"], ["next_number", "twice"]  # 24, 6, 12; 16, 10 rows
CHECKPOINTS = [{"step": 2, "learning_rate": 3e-3}, {"step": 4, "learning_rate": 1e-3}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny job (unequal sets, dropout 0.1) with GradDot (mean), GradCos and TracIn (sum),
    and three randomly initialised weight sets standing in for the base model and two
    checkpoints; 8 evaluated rows per set."""
    from conftest import merge, tiny_spec

    tmp = tmp_path_factory.mktemp("products")
    spec_map = merge(tiny_spec(tmp), {
        "training": {"checkpoints": [2, 4]},
        "methods": {"graddot": {"batch_size": 5}, "gradcos": {"batch_size": 5},
                    "tracin": {"batch_size": 5, "aggregate": "sum"}},
        "evaluation": {"max_examples": 8},
    })
    import yaml

    (tmp / "job.yaml").write_text(yaml.safe_dump(spec_map))
    spec = load_spec(tmp / "job.yaml")
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    assert config.resid_pdrop == 0.1
    weights = {name: SharedWeights.from_model(build_model(config, seed=seed))
               for seed, name in enumerate([BASE, "ckpt/2", "ckpt/4"])}
    indices = {n: sample_indices(data.n_rows[n], 8, 0) for n in data.sets}
    return spec, data, weights, indices


@pytest.fixture(scope="module")
def engine(setup, ray_cluster):
    """A pool of two actors over the setup's weight sets, shared by the tests below."""
    spec, data, weights, indices = setup
    with Engine(ResourcesSpec(num_actors=2), weights, data.sets, data.tokenizer.pad_token_id,
                indices, 16, max_useful_actors=2) as pool:
        yield pool


def _direct_cells(setup) -> dict[tuple[str, str, str], float]:
    """The cells as computed before: every gradient in full in this process (dataset_gradient
    on the model), then float64 dot products and float32 norms on the driver."""
    spec, data, weights, indices = setup
    batch = 5

    def grad(w: str, name: str, reduction: str) -> np.ndarray:
        d = data.tokenized(name)
        rows = np.arange(len(d)) if name in TRAIN else indices[name]
        return dataset_gradient(weights[w].build("cpu"), d, rows, batch, reduction=reduction)

    cells = {}
    g = {(w, n): grad(w, n, "sum" if w != BASE and n in TRAIN else "mean")
         for w in weights for n in [*TRAIN, *TEST]}
    lr = {f"ckpt/{c['step']}": c["learning_rate"] for c in CHECKPOINTS}
    for k in TRAIN:
        for j in TEST:
            gk, gj = g[BASE, k], g[BASE, j]
            dot = float(np.dot(gk.astype(np.float64), gj))
            cells["graddot", k, j] = dot
            cells["gradcos", k, j] = dot / float(np.linalg.norm(gk) * np.linalg.norm(gj))
            cells["tracin", k, j] = sum(
                lr[w] * float(np.dot(g[w, k].astype(np.float64), g[w, j])) for w in lr)
    return cells


def test_cells_equal_the_direct_computation_and_the_driver_gets_no_gradient(setup, engine):
    spec = setup[0]
    plan = plan_gradients(spec, TRAIN, TEST, CHECKPOINTS)
    # one task per (weights, training set); the test sets' gradients are the tasks' inputs
    assert len(plan.tasks) == 3 * len(TRAIN)
    assert all(t.tests == tuple(TEST) for t in plan.tasks)
    handed = []
    results = engine.map(plan.tasks, on_result=handed.append)
    # a gradient task alone: its gradient stays in the object store, the driver gets a
    # reference (fetched here only to check it)
    (alone,) = engine.map([GradientTask(BASE, "twice", False, 5)])
    assert isinstance(alone.payload, ray.ObjectRef)
    assert len(ray.get(alone.payload)) > 20_000
    # what the driver received (and what the run stores): a few numbers per task
    assert len(handed) == len(plan.tasks)
    for r in handed:
        assert set(r.payload) == {(r.task.dataset, j) for j in TEST} | {
            (r.task.dataset, r.task.dataset), *((j, j) for j in TEST)}
        assert all(isinstance(v, float) for v in r.payload.values())
        assert r.losses == {} and r.row_losses is None
        assert len(encode(r, "key")) < 4096  # the stored file: no gradient in it
    cells = {(c["method"], c["train_set"], c["test_set"]): c["influence"]
             for c in plan.assemble(results, {})}
    expected = _direct_cells(setup)
    assert set(cells) == set(expected)
    for key, value in expected.items():
        assert cells[key] == pytest.approx(value, rel=1e-6), key
    assert all(abs(cells["gradcos", k, j]) <= 1.0 for k in TRAIN for j in TEST)


@dataclass(frozen=True)
class LoggedGradient(GradientTask):
    """A GradientTask that appends a line to a log file each time it runs."""

    log: str = ""

    def needs(self) -> tuple[GradientTask, ...]:
        return tuple(LoggedGradient(self.weights, t, False, self.batch_size, log=self.log)
                     for t in self.tests)

    def run(self, bench, *inputs):
        with open(self.log, "a") as f:
            f.write(f"{self.dataset}\n")
        return super().run(bench, *inputs)


@dataclass(frozen=True)
class LoseInputsOnce(LoggedGradient):
    """Fails the first time as a task does whose inputs' node died (ray.get raises)."""

    marker: str = ""

    def run(self, bench, *inputs):
        if not Path(self.marker).exists():
            Path(self.marker).write_text("lost")
            raise ObjectLostError("0" * 56, "", "")
        return super().run(bench, *inputs)


def test_a_task_whose_inputs_were_lost_computes_them_again_and_runs_again(engine, tmp_path):
    log = str(tmp_path / "runs.log")
    tests = tuple(TEST)
    task = LoseInputsOnce(BASE, "double", True, 5, tests=tests, log=log,
                          marker=str(tmp_path / "lost"))
    plain = LoggedGradient(BASE, "spell", True, 5, tests=tests, log=log)
    retried = []
    lost, other = engine.map([task, plain],
                             on_retry=lambda t, reason: retried.append((t, reason)))
    (undisturbed,) = engine.map([GradientTask(BASE, "double", True, 5, tests=tests)])
    assert retried == [(task, LOST_INPUTS)]
    runs = Path(log).read_text().split()
    # each test set's gradient: once first, once again after the loss; each training set once
    assert sorted(runs) == sorted([*TEST, *TEST, "double", "spell"])
    assert lost.payload == pytest.approx(undisturbed.payload, rel=1e-12)
    assert other.payload[("spell", "twice")] != 0.0
