"""Finished tasks kept durably (task_store.py) in a real MLflow run: keys that change with any
setting, a lossless file format, a damaged or foreign file never restored, and results kept
locally while the store refuses them, stored once it takes them again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_spec
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.tasks import EkfacTask, EvalTask, GradientTask, TaskResult, UnlearnTask
from untrac_ray.results.task_store import StoredResultError, TaskStore, decode, encode, task_key
from untrac_ray.results.tracking import JobRun


def _unlearn(lr: float = 1e-3) -> UnlearnTask:
    return UnlearnTask("untrac", "add_one", ("next_number", "twice"),
                       UnlearnSpec(learning_rate=lr, max_steps=4), (2, 4))


def test_keys_name_the_task_and_change_with_any_setting():
    key = task_key(_unlearn(), "job")
    assert key.startswith("unlearn-untrac-add_one-")
    assert task_key(_unlearn(), "job") == key  # stable
    assert task_key(_unlearn(2e-3), "job") != key  # a setting of the task
    assert task_key(_unlearn(), "other data") != key  # the job's data, model, evaluation
    assert task_key(EvalTask(("twice",)), "job").startswith("eval-twice-")


def test_every_kind_of_result_survives_a_round_trip():
    rows = {"add_one": np.array([0.5, 1.25], dtype=np.float32)}
    cases = [
        TaskResult(_unlearn(), {2: {"twice": 1.5}, 4: {"twice": 2.0}}, 3.0, "node/pid1",
                   row_losses=rows),
        TaskResult(GradientTask("base", "add_one", True, 8), {}, 1.0,
                   payload=np.arange(5, dtype=np.float32)),
        TaskResult(EkfacTask(("a", "b"), ("t",), None), {}, 2.0,
                   payload={("a", "t"): 0.25, ("b", "t"): -1.5}),
    ]
    for result in cases:
        key = task_key(result.task, "job") if not isinstance(result.task, EkfacTask) else "k"
        back = decode(encode(result, key), result.task, key)
        assert back.losses == result.losses and back.seconds == result.seconds
        assert back.worker == result.worker
        if isinstance(result.payload, dict):
            assert back.payload == result.payload
        elif result.payload is not None:
            np.testing.assert_array_equal(back.payload, result.payload)
            assert back.payload.dtype == result.payload.dtype
        if result.row_losses is not None:
            np.testing.assert_array_equal(back.row_losses["add_one"], rows["add_one"])
    data = encode(cases[0], "key-a")
    with pytest.raises(StoredResultError, match="other settings"):
        decode(data, cases[0].task, "key-b")
    with pytest.raises(StoredResultError, match="unreadable"):
        decode(data[: len(data) // 2], cases[0].task, "key-a")


def test_results_stay_local_while_the_store_refuses_them_and_are_stored_after(tmp_path):
    spec = JobSpec.model_validate(tiny_spec(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    task, other = EvalTask(("twice",)), EvalTask(("next_number",))
    with JobRun(spec, uri) as run:
        artifacts = run.client.get_run(run.run_id).info.artifact_uri.removeprefix("file://")
        blocker = Path(artifacts) / "tasks"  # a file where the folder must go: uploads fail
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("in the way")
        store = TaskStore(run, tmp_path / "spool", "job")
        assert not store.save(TaskResult(task, {0: {"twice": 1.0}}, 0.5))
        assert store.upload_error and len(store.pending()) == 1
        assert store.restore([task, other]).keys() == {0}  # the spool counts on resume
        blocker.unlink()  # the store is back
        assert store.save(TaskResult(other, {0: {"next_number": 2.0}}, 0.5))
        assert store.flush() == 0 and store.pending() == []
        assert run.stored_task_keys() == {store.key(task), store.key(other)}
        (tmp_path / "spool" / f"{store.key(task)}.npz").write_bytes(b"damaged")
        fresh = TaskStore(run, tmp_path / "spool", "job")
        restored = fresh.restore([other, task])
        assert restored[1].losses == {0: {"twice": 1.0}} and restored[1].index == 1
        assert restored[0].losses == {0: {"next_number": 2.0}}
        # another job's settings (its data or model changed): nothing restored
        assert TaskStore(run, tmp_path / "spool", "changed").restore([task, other]) == {}
