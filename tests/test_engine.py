"""The Ray engine: pool sizing, retries after an actor dies, nothing finished is recomputed."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray import cloudpickle

from untrac_ray.engine.pool import Engine, plan_pool_size
from untrac_ray.inputs.errors import UntracError
from untrac_ray.inputs.spec_sections import ResourcesSpec
from untrac_ray.methods.tasks import EvalTask

# The tasks below are defined in this test module: ship them to the workers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class LoggedEval(EvalTask):
    """An EvalTask that appends a line to a log file each time it starts."""

    log: str = ""

    def run(self, bench):
        with open(self.log, "a") as f:
            f.write(f"{self.datasets[0]}\n")
        return super().run(bench)


@dataclass(frozen=True)
class CrashOnce(LoggedEval):
    """Kills its actor's process the first time it runs, then behaves."""

    marker: str = ""

    def run(self, bench):
        if not Path(self.marker).exists():
            Path(self.marker).write_text("crashed")
            with open(self.log, "a") as f:
                f.write(f"{self.datasets[0]}\n")
            os._exit(1)
        return super().run(bench)


def test_pool_size_follows_gpus_or_cpu_slots():
    cpu = ResourcesSpec(cpus_per_actor=1)
    assert plan_pool_size(cpu, {"CPU": 2.0}, max_useful=8) == 2
    assert plan_pool_size(cpu, {"CPU": 16.0}, max_useful=5) == 5
    assert plan_pool_size(ResourcesSpec(cpus_per_actor=4), {"CPU": 6.0}, 8) == 1
    gpu = ResourcesSpec(gpus_per_actor=1)
    assert plan_pool_size(gpu, {"CPU": 64.0, "GPU": 8.0}, max_useful=20) == 8
    assert plan_pool_size(ResourcesSpec(gpus_per_actor=0.5), {"GPU": 3.0}, 20) == 6
    assert plan_pool_size(ResourcesSpec(num_actors=3), {"CPU": 1.0}, 20) == 3
    with pytest.raises(UntracError, match="has no GPU"):
        plan_pool_size(gpu, {"CPU": 8.0}, max_useful=4)


def test_a_task_whose_actor_dies_is_retried_and_finished_tasks_are_kept(
    engine_inputs, ray_cluster, tmp_path, capfd
):
    spec, data, weights, indices = engine_inputs
    log = str(tmp_path / "starts.log")
    names = list(data.tables)
    tasks = [LoggedEval((n,), log=log) for n in names]
    crash = CrashOnce(("spell",), log=log, marker=str(tmp_path / "crashed"))
    tasks.insert(2, crash)
    seen = []
    with Engine(ResourcesSpec(num_actors=2, max_retries=2), weights, data.tables,
                data.tokenizer.pad_token_id, indices, 16, max_useful_actors=2) as engine:
        results = engine.map(tasks, on_result=lambda r: seen.append(r.task))
    assert Path(crash.marker).exists()
    assert seen.count(crash) == 1 and len(seen) == len(tasks)  # each result handed over once
    starts = Path(log).read_text().split()
    # every task started once, except the crashed one: twice (the crash and the retry)
    assert sorted(starts) == sorted(names + ["spell", "spell"])
    # the retried task measured the same loss as the plain task on the same set
    assert results[2].losses == results[names.index("spell") + 1].losses
    # no object-store arguments in the actors' constructors, so restarts are safe and Ray
    # does not warn that they may fail (ray-project/ray#53727)
    assert "constructor arguments in the object store" not in capfd.readouterr().err


def test_an_error_in_a_task_stops_the_map_with_that_error(engine_inputs, ray_cluster):
    spec, data, weights, indices = engine_inputs
    with Engine(ResourcesSpec(num_actors=1), weights, data.tables, data.tokenizer.pad_token_id,
                indices, 16, max_useful_actors=1) as engine:
        with pytest.raises(UntracError, match="no_such_set"):
            engine.map([EvalTask(("no_such_set",))])
