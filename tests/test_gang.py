"""Gangs on Ray (untrac_ray/engine/gang.py): with resources.actors_per_task: 2 every task runs on a
gang of two actors sharing one FSDP-sharded model (gloo on the CPU here), on the session's
local Ray (2 CPUs: one gang of two 1-CPU actors).

- A whole job on a tiny Llama gives the same UnTrac and UnTrac-Inv cells with gangs of 2 as
  with single actors. Dropout is off, so the two differ only by float32 rounding (sums taken
  in another order across ranks): TOL.
- A gang whose member is killed mid-task is replaced whole and the task retried: the map
  finishes with the result one Workbench gives.
- What a gang cannot run is refused when the spec loads, one line each.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from conftest import merge, tiny_spec
from untrac_ray.engine.pool import Engine, plan_pool_size
from untrac_ray.inputs.errors import SpecError, UntracError
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_sections import SHARDED_UNLEARNING, ResourcesSpec
from untrac_ray.methods.tasks import EvalTask
from untrac_ray.results.store import TAG_PREFIX
from untrac_ray.run.runner import run_job

# SlowEval and FailOnRank1 below are defined in this test module: ship it to the workers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TOL = 1e-4  # absolute, on cells of order 0.01-1; measured: < 1e-6 (printed)
LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "attention_dropout": 0.0,
}


def llama_job(tmp: Path, override: dict | None = None) -> dict[str, Any]:
    """The tests' tiny job (conftest.tiny_spec) on a tiny Llama without dropout: UnTrac with
    Adam (batches of 8 rows: 4 per rank), UnTrac-Inv with SGD (16 rows)."""
    spec = merge(tiny_spec(tmp), {"model": None})  # replace the GPT-2 config, not merge into it
    return merge(spec, {"model": {"config": LLAMA}, **(override or {})})


def write_job(tmp: Path, spec: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- A whole job: gangs of 2 give the cells single actors give ---


def cells(table) -> dict[tuple, float]:
    """The influence table as {(method, train set, test set, point): influence}."""
    keys = zip(table["method"], table["train_set"], table["test_set"], table["point"],
               strict=True)
    return dict(zip(keys, table["influence"].to_numpy(float), strict=True))


def test_a_job_on_gangs_of_two_gives_the_cells_of_single_actors(tmp_path, tracking_uri,
                                                               ray_cluster):
    spec = llama_job(tmp_path)
    started = time.perf_counter()
    single = run_job(load_spec(write_job(tmp_path, spec, "single.yaml")), tracking_uri)
    middle = time.perf_counter()
    ganged = run_job(load_spec(write_job(
        tmp_path, merge(spec, {"resources": {"actors_per_task": 2}}), "gang.yaml")), tracking_uri)
    ended = time.perf_counter()
    want, got = cells(single.table), cells(ganged.table)
    assert got.keys() == want.keys()
    assert {m for m, *_ in want} == {"untrac", "untrac_inv"}
    diff = max(abs(got[k] - want[k]) for k in want)
    base = max(abs(ganged.base_losses[n] - single.base_losses[n]) for n in single.base_losses)
    print(f"\nsingle actors: {middle - started:.1f} s; gang of 2: {ended - middle:.1f} s; "
          f"max cell difference {diff:.2e}, max base-loss difference {base:.2e} "
          f"over {len(want)} cells")
    assert diff < TOL and base < TOL
    # not vacuous: unlearning moved the losses by far more than TOL
    assert max(abs(v) for v in want.values()) > 100 * TOL
    # 2 CPUs: two single actors, or one gang of two (one place in the pool)
    client = MlflowClient(tracking_uri)
    assert client.get_run(single.run_id).data.tags[TAG_PREFIX + "actors"] == "2"
    assert client.get_run(ganged.run_id).data.tags[TAG_PREFIX + "actors"] == "1"


# --- A gang that loses a member is replaced whole, and its task retried ---


@dataclass(frozen=True)
class SlowEval(EvalTask):
    """An EvalTask that sleeps first the first time it runs (until `marker` exists), so that
    it is still running when a member of its gang is killed: a rank that sleeps, while the
    other sleeps too or waits for it in the evaluation's first collective."""

    sleep: float = 0.0
    marker: str = ""

    def run(self, bench):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            time.sleep(self.sleep)
        return super().run(bench)


@pytest.fixture
def llama_inputs(tmp_path):
    """What an Engine is built from, for the tiny job on the tiny Llama."""
    from untrac_ray.compute.evaluation import sample_indices
    from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
    from untrac_ray.run.job_setup import prepare_data

    spec = load_spec(write_job(tmp_path, llama_job(tmp_path)))
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    weights = {"base": SharedWeights.from_model(build_model(config, seed=0))}
    indices = {n: sample_indices(data.n_rows[n], None, 0) for n in data.sets}
    return data, weights, indices


@dataclass(frozen=True)
class FailOnRank1(EvalTask):
    """An EvalTask that raises on rank 1 only: rank 0 goes on into a collective and waits."""

    def run(self, bench):
        if bench.gang.rank == 1:
            raise RuntimeError("rank 1 could not run it")
        return super().run(bench)


@pytest.mark.slow  # 30-50 s on this machine; the gang's cells are checked in the default suite
def test_a_gang_that_loses_a_member_mid_task_is_replaced_and_the_task_retried(
    llama_inputs, ray_cluster, tmp_path
):
    from untrac_ray.methods.workbench import Workbench

    data, weights, indices = llama_inputs
    names = tuple(data.sets)
    task = SlowEval(names, per_row=True, sleep=3.0, marker=str(tmp_path / "ran"))
    retried = []
    resources = ResourcesSpec(actors_per_task=2, max_retries=1)
    with Engine(resources, weights, data.sets, data.tokenizer.pad_token_id, indices, 16,
                max_useful_actors=1) as engine:
        engine.wait_ready()
        (gang,) = engine.actors
        # rank 0's rendezvous store listens on the node's address only, not on every interface
        host, port = ray.get(gang.address)
        pid = int(ray.get(gang.prepared).split("/")[1].removeprefix("pid"))
        (store,) = [c.laddr for c in psutil.Process(pid).net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert store.ip == host
        # rank 1 dies while the task runs: rank 0 must not wait for it
        killer = threading.Timer(1.0, ray.kill, (gang.members[1],), {"no_restart": True})
        killer.start()
        started = time.perf_counter()
        (result,) = engine.map([task], on_retry=lambda t, reason: retried.append((t, reason)))
        print(f"\nkilled, replaced and retried in {time.perf_counter() - started:.1f} s: "
              f"{retried[0][1] if retried else ''}")
        started = time.perf_counter()
        killer.join()
        (replacement,) = engine.actors
        assert replacement is not gang
        assert not {m._actor_id for m in replacement.members} & {
            m._actor_id for m in gang.members}
        # an error of one rank stops the map with that error (rank 0 does not wait for it in
        # the collective), and the gang, its ranks out of step, is replaced before the next task
        with pytest.raises(UntracError, match=r"failed: RuntimeError\('rank 1 could not run it"):
            engine.map([FailOnRank1(names[:1])])
        failed = time.perf_counter()
        (again,) = engine.map([EvalTask(names, per_row=True)],
                              on_retry=lambda t, reason: retried.append((t, reason)))
        print(f"rank 1's error stopped the map in {failed - started:.1f} s; replaced and ran in "
              f"{time.perf_counter() - failed:.1f} s")
        assert engine.actors[0] is not replacement
        assert again.losses == result.losses
    assert len(retried) == 2 and retried[0][0] == task
    assert "rank0of2 died" in retried[1][1]
    assert retried[0][1].startswith("actor ") and "rank0of2 died" in retried[0][1]
    assert result.worker.endswith("/rank0of2")
    reference = Workbench(weights, {n: data.tokenized(n) for n in names}, indices, 16).run(
        EvalTask(names, per_row=True))
    for name in names:
        assert abs(result.losses[0][name] - reference.losses[0][name]) < TOL
        np.testing.assert_allclose(result.row_losses[name], reference.row_losses[name],
                                   atol=TOL)


# --- Pool size and spec refusals (no Ray) ---


def test_a_pool_counts_gangs_with_their_total_resources_node_by_node():
    nodes = [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 3}]
    gangs = ResourcesSpec(gpus_per_actor=1, actors_per_task=2)
    assert plan_pool_size(gangs, {"CPU": 32, "GPU": 7}, 10, nodes=nodes) == 3  # 2 + 1
    assert plan_pool_size(gangs.model_copy(update={"actors_per_task": 4}), {}, 10,
                          nodes=nodes) == 1  # a gang lives on one node
    cpu = ResourcesSpec(cpus_per_actor=1, actors_per_task=2)
    assert plan_pool_size(cpu, {"CPU": 2}, 10, nodes=[{"CPU": 2}]) == 1
    assert plan_pool_size(cpu.model_copy(update={"num_actors": 6}), {}, 10) == 3
    with pytest.raises(Exception, match="per actor \\(times actors_per_task: 4, on one node\\)"):
        plan_pool_size(ResourcesSpec(gpus_per_actor=1, actors_per_task=4), {"GPU": 6}, 10,
                       nodes=[{"CPU": 8, "GPU": 3}, {"CPU": 8, "GPU": 3}])


def refusal(tmp_path: Path, override: dict) -> str:
    """The one-line SpecError of the tiny Llama job with gangs of 2 and `override`."""
    spec = merge(llama_job(tmp_path), {"resources": {"actors_per_task": 2}})
    with pytest.raises(SpecError) as caught:
        load_spec(write_job(tmp_path, merge(spec, override)))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("method", ["graddot", "gradcos", "tracin", "ekfac"])
def test_methods_that_cannot_run_sharded_are_refused(tmp_path, method):
    override = {"methods": {method: {}}}
    if method == "tracin":
        override["training"] = {"checkpoints": [1]}
    if method == "ekfac":
        pytest.importorskip("kronfluence")
    assert f"methods.{method}: cannot run sharded (resources.actors_per_task: 2)" in refusal(
        tmp_path, override)


@pytest.mark.parametrize("method", ["untrac", "untrac_inv"])
def test_adafactor_is_refused_for_sharded_unlearning(tmp_path, method):
    message = refusal(tmp_path, {"methods": {method: {"optimizer": "adafactor"}}})
    assert (f"methods.{method}.optimizer: adafactor cannot update sharded parameters "
            "(resources.actors_per_task: 2); use adam or sgd") in message


def test_other_settings_a_gang_lacks_are_refused(tmp_path):
    assert "resources: num_actors: 3 actors do not make whole gangs" in refusal(
        tmp_path, {"resources": {"num_actors": 3}})
    assert "resources: weights_dtype: bf16 is not available with actors_per_task: 2" in refusal(
        tmp_path, {"resources": {"weights_dtype": "bf16"}})
    assert "resources: gradient_checkpointing: not available" in refusal(
        tmp_path, {"resources": {"gradient_checkpointing": True}})
    search = {"space": {"untrac.learning_rate": [1e-3, 1e-2]},
              "objective": {"function": "math:fsum"}}
    assert "search: trials run without gangs" in refusal(tmp_path, {"search": search})
    # and what a gang runs loads: adam, sgd; LDO (training's optimizers)
    spec = merge(llama_job(tmp_path), {"resources": {"actors_per_task": 2, "num_actors": 4},
                                       "methods": {"ldo": {}}})
    assert load_spec(write_job(tmp_path, spec)).resources.actors_per_task == 2


def test_the_spec_allows_only_optimizers_the_sharded_bench_runs():
    from untrac_ray.engine.sharded import SHARDED_OPTIMIZERS
    from untrac_ray.inputs.spec_sections import TrainingSpec

    assert set(SHARDED_UNLEARNING) <= set(SHARDED_OPTIMIZERS)
    training = TrainingSpec.model_fields["optimizer"].annotation.__args__
    assert set(training) <= set(SHARDED_OPTIMIZERS)
