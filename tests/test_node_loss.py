"""A job survives losing a node: on a real multi-node Ray cluster (ray.cluster_utils.Cluster on
this machine) a worker node is removed while its actor works, and the job still finishes with
every cell, equal to an undisturbed run's; and a map survives an actor killed mid-task."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle
from ray.cluster_utils import Cluster

from untrac_ray.engine import pool as engine_module
from untrac_ray.engine.actor import workbench_from_refs
from untrac_ray.engine.pool import Engine
from untrac_ray.inputs.errors import UntracError
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_sections import ResourcesSpec
from untrac_ray.methods.tasks import EvalTask
from untrac_ray.run.job_setup import Reporter
from untrac_ray.run.runner import run_job

# The tasks below are defined in this test module: ship them to the workers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODE_MEMORY = 100 * 2**20  # each node's object store


def _start_session_ray() -> None:
    """The session's local Ray, as tests/conftest.py's `ray_cluster` fixture starts it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=300 * 2**20, logging_level="ERROR")


@contextlib.contextmanager
def _two_node_cluster(**worker: float) -> Iterator[Cluster]:
    """A head without CPUs (the driver's objects live there) and two worker nodes with the
    given resources, Ray connected to it. Ray is shut down and the cluster torn down
    afterwards, even on failure; the session's local Ray (ray_cluster) is started again if it
    was running."""
    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=0, object_store_memory=NODE_MEMORY, include_dashboard=False)
        for _ in range(2):
            cluster.add_node(object_store_memory=NODE_MEMORY, **worker)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        yield cluster
    finally:
        try:
            ray.shutdown()
            cluster.shutdown()
        finally:
            if had_ray:
                _start_session_ray()


@pytest.fixture
def cluster():
    """Two worker nodes of one CPU: one actor each."""
    with _two_node_cluster(num_cpus=1) as c:
        yield c


class RemoveNodeAfterFirstTask(Reporter):
    """Removes a worker node once the job's first task finished: the node of the other actor,
    at work on its task then."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.removed: str | None = None
        self.retried: list[str] = []

    def task_done(self, result, cells: int) -> None:
        if self.removed is None:
            finished_on = result.worker.split("/")[0]
            (node,) = [n for n in self.cluster.worker_nodes
                       if not n.node_id.startswith(finished_on)]
            self.removed = node.node_id
            self.cluster.remove_node(node)

    def task_retried(self, task, reason: str) -> None:
        self.retried.append(reason)


@pytest.fixture
def watched_maps(monkeypatch):
    """Engine.map, watched: each map waits for its whole pool first (so that every actor works
    from the start), records each re-queued (task, reason), and afterwards reruns each
    re-queued task in a Workbench in this process: the undisturbed reference of its result."""
    seen = SimpleNamespace(retries=[], redone=[])  # redone: (result in the job, reference)
    original = engine_module.Engine.map

    def map_(self, tasks, on_result=None, on_retry=None):
        def record(task, reason):
            seen.retries.append((task, reason))
            if on_retry is not None:
                on_retry(task, reason)

        self.wait_ready()
        before = len(seen.retries)
        results = original(self, tasks, on_result, on_retry=record)
        retried = [task for task, _ in seen.retries[before:]]
        if retried:  # results carry copies of the tasks (back from the actors): match by index
            pad_id, indices, batch_size, threads = self._args
            bench = workbench_from_refs(self._shared, pad_id, indices, batch_size, "cpu",
                                        self.resources.precision)
            driver_threads = torch.get_num_threads()
            torch.set_num_threads(threads)  # as in the actors
            try:
                for task, result in zip(tasks, results, strict=True):
                    if any(task is t for t in retried):
                        seen.redone.append((result, bench.run(task)))
            finally:
                torch.set_num_threads(driver_threads)
        return results

    monkeypatch.setattr(engine_module.Engine, "map", map_)
    return seen


def test_a_job_finishes_after_a_worker_node_is_lost(make_job, tracking_uri, cluster,
                                                     watched_maps):
    # UnTrac long enough (8 epochs) that the other actor is still at work when the first
    # task (the smallest set) finishes
    spec = load_spec(make_job({
        "resources": {"cpus_per_actor": 1, "max_retries": 2},
        "methods": {"untrac": {"epochs": 8, "eval_every": 4}},
    }))
    reporter = RemoveNodeAfterFirstTask(cluster)
    outcome = run_job(spec, tracking_uri, address=cluster.address, reporter=reporter)
    assert reporter.removed is not None
    assert sum(n["Alive"] for n in ray.nodes()) == 2  # the head and one worker
    # the lost actor's task was re-queued once and finished on the surviving actor
    assert len(watched_maps.retries) == 1
    task, reason = watched_maps.retries[0]
    assert reason.startswith("actor " + reporter.removed[:8] + "/"), reason
    assert "node has died" in reason, reason  # Ray's words for a lost node
    assert reporter.retried == [reason]  # the runner passed it on
    # every cell is there (each method x training set x test set at the method's points),
    # finite, and the redone task measured what an undisturbed run measures
    table = outcome.table
    train, test = [d.name for d in spec.data.train], [d.name for d in spec.data.test]
    for method in spec.methods.enabled():
        rows = table[table["method"] == method]
        points = sorted(set(rows["point"]))
        assert len(points) > 1
        cells = zip(rows["train_set"], rows["test_set"], rows["point"], strict=True)
        assert sorted(cells) == sorted(
            (tr, te, p) for tr in train for te in test for p in points)
    assert np.isfinite(table["influence"].to_numpy(float)).all()
    ((result, reference),) = watched_maps.redone
    assert result.task == task and result.worker.split("/")[0] != reporter.removed[:8]
    assert result.losses == reference.losses


@dataclass(frozen=True)
class SlowEval(EvalTask):
    """An EvalTask that sleeps first, so that it is still running when its actor is killed."""

    sleep: float = 0.0

    def run(self, bench):
        time.sleep(self.sleep)
        return super().run(bench)


def test_a_map_finishes_when_an_actor_is_killed_mid_task(engine_inputs, ray_cluster):
    _, data, weights, indices = engine_inputs
    names = list(data.sets)
    # the first task is quick; the second is still running when the first result arrives
    tasks = [SlowEval((n,), sleep=5.0 if i == 1 else 0.2) for i, n in enumerate(names)]
    retried, killed = [], []

    with Engine(ResourcesSpec(num_actors=2, max_retries=1), weights, data.sets,
                data.tokenizer.pad_token_id, indices, 16, max_useful_actors=2) as engine:
        engine.wait_ready()
        labels = {ray.get(a.prepare.remote({})): a for a in engine.actors}  # built: no refs

        def on_result(result):
            if not killed:  # the other actor is at work on the slow task: kill it
                (busy,) = [a for label, a in labels.items() if label != result.worker]
                killed.append(busy)
                ray.kill(busy, no_restart=True)

        results = engine.map(tasks, on_result,
                             on_retry=lambda task, reason: retried.append((task, reason)))
        assert len(engine.actors) == 2 and killed[0] not in engine.actors  # replaced
    assert [r.task for r in results] == tasks
    assert all(r.losses[0] for r in results)
    assert len(retried) == 1
    task, reason = retried[0]
    assert task == tasks[1] and "killed by `ray.kill`" in reason


@dataclass(frozen=True)
class Vector(EvalTask):
    """A payload kept in the object store of the node where it is made, as a test gradient
    is (1.6 MB: Ray keeps objects under 100 KiB with their owner, the driver, instead)."""

    @property
    def payload_in_store(self) -> bool:
        return True

    def run(self, bench):
        out = super().run(bench)
        out.payload = np.full(200_000, float(len(self.datasets[0])))
        return out


@dataclass(frozen=True)
class SlowReader(EvalTask):
    """Reads vectors, as a gradient task reads the test gradients, then sleeps."""

    reads: tuple[str, ...] = ()
    sleep: float = 0.0

    def needs(self) -> tuple[Vector, ...]:
        return tuple(Vector((name,)) for name in self.reads)

    def run(self, bench, *vectors):
        time.sleep(self.sleep)
        out = super().run(bench)
        out.payload = float(sum(v.sum() for v in vectors))
        return out


def test_a_lost_node_costs_only_its_own_task_one_retry(engine_inputs, cluster):
    """The pool's two actors each make one of two vectors (test gradients, say); the slow
    reader reads both, so its node holds both, and the other node only the one it made. That
    node keeps the quick task, which reads none; then the slow reader's node is removed. The
    slow reader is retried on the survivor, which makes the lost vector again first: with
    max_retries 1 the map finishes. (The vector made on the lost node used to stay among the
    pool's inputs: the retried reader read it, found it lost, and counted a second death: the
    job failed.)"""
    _, data, weights, indices = engine_inputs
    tasks = [SlowReader(("spell",), sleep=0.2),
             SlowReader(("double",), reads=("next_number", "twice"), sleep=6.0)]
    retried = []
    with Engine(ResourcesSpec(cpus_per_actor=1, max_retries=1), weights, data.sets,
                data.tokenizer.pad_token_id, indices, 16, max_useful_actors=2) as engine:
        engine.wait_ready()
        assert engine.size == 2
        removed = []

        def on_result(result):
            if not removed and result.task == tasks[0]:  # the other actor is at work on the
                finished_on = result.worker.split("/")[0]  # slow reader: remove its node
                (node,) = [n for n in cluster.worker_nodes
                           if not n.node_id.startswith(finished_on)]
                cluster.remove_node(node)
                removed.append(node)

        results = engine.map(tasks, on_result,
                             on_retry=lambda task, reason: retried.append(reason))
    assert removed and [r.task for r in results] == tasks
    assert [r.payload for r in results] == [0.0, 2e5 * len("next_number" + "twice")]
    deaths = [r for r in retried if "died" in r]
    assert len(deaths) == 1 and "node has died" in deaths[0], retried


@dataclass(frozen=True)
class AlwaysCrash(EvalTask):
    """Kills whichever actor runs it (as a task that runs out of memory would)."""

    def run(self, bench):
        os._exit(1)


def test_a_task_that_kills_every_actor_fails_in_one_line(engine_inputs, ray_cluster):
    _, data, weights, indices = engine_inputs
    retried = []
    with Engine(ResourcesSpec(num_actors=2, max_retries=1), weights, data.sets,
                data.tokenizer.pad_token_id, indices, 16, max_useful_actors=2) as engine:
        with pytest.raises(UntracError) as caught:
            engine.map([AlwaysCrash(("spell",))],
                       on_retry=lambda task, reason: retried.append(reason))
    message = str(caught.value)
    assert "\n" not in message and len(retried) == 1
    assert message.startswith("task base-eval:spell failed: its actor died 2 times (actor ")
    assert "worker process has died" in message


def test_a_map_without_any_actor_able_to_start_stops_after_the_start_timeout(
    engine_inputs, ray_cluster
):
    _, data, weights, indices = engine_inputs
    started = time.monotonic()
    # the pool reserves its actors' room first: none fits, and it says so after the timeout
    with pytest.raises(UntracError, match=r"^no actor could be started in 2 s \(no node"):
        Engine(ResourcesSpec(num_actors=1, placement_timeout_s=1), weights, data.sets,
               data.tokenizer.pad_token_id, indices, 16, max_useful_actors=1, start_timeout_s=2,
               actor_options={"resources": {"no_such_resource": 1}})
    assert time.monotonic() - started < 30


@pytest.fixture
def gpu_cluster():
    """Two worker nodes of 2 CPUs and 1 (logical) GPU each."""
    with _two_node_cluster(num_cpus=2, num_gpus=1) as c:
        yield c


@ray.remote(num_gpus=1, num_cpus=0)
class EntrypointGpu:
    """Holds one GPU, as the supervisor of a job submitted with --entrypoint-gpus 1 does."""

    def ready(self) -> bool:
        return True


def test_a_pool_starts_only_the_actors_that_fit_beside_the_drivers_gpu(engine_inputs,
                                                                       gpu_cluster):
    """The cluster has 2 GPUs in all and the driver holds one: a pool of one GPU per actor
    counts 2 from the nodes, places 1, and finishes every task on it (no actor left waiting
    for a GPU that never frees, which would hang the map)."""
    _, data, weights, indices = engine_inputs
    holder = EntrypointGpu.remote()
    ray.get(holder.ready.remote())
    resources = ResourcesSpec(gpus_per_actor=1, cpus_per_actor=1, placement_timeout_s=3)
    names = list(data.sets)
    with Engine(resources, weights, data.sets, data.tokenizer.pad_token_id, indices, 16,
                max_useful_actors=len(names), start_timeout_s=90) as engine:
        assert engine.size == 1 and engine.reservation.wanted == 2
        assert ray.available_resources().get("GPU", 0) == 0  # the pool's and the driver's
        results = engine.map([EvalTask((n,)) for n in names])
    assert [r.task.datasets for r in results] == [(n,) for n in names]
    assert all(np.isfinite(list(r.losses[0].values())).all() for r in results)
    deadline = time.monotonic() + 10  # the pool's room is given back when it shuts down
    while ray.available_resources().get("GPU", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 1
    # on an autoscaling cluster every actor asked for is kept: those without room start as
    # nodes join, and the map does not wait for them
    autoscaled = resources.model_copy(update={"autoscale": True, "num_actors": 3})
    with Engine(autoscaled, weights, data.sets, data.tokenizer.pad_token_id, indices, 16,
                max_useful_actors=len(names), start_timeout_s=90) as engine:
        assert engine.size == 3
        assert len(engine.map([EvalTask((n,)) for n in names])) == len(names)
    ray.kill(holder)


def test_autoscale_asks_for_num_actors():
    with pytest.raises(ValueError, match="autoscale: give num_actors too"):
        ResourcesSpec(autoscale=True)
    assert ResourcesSpec(autoscale=True, num_actors=4, gpus_per_actor=1).num_actors == 4
