"""One job set-up for `run` and `tune`: data, base model, shared objects, and durable tasks.

`open_session` does, in this order, what both commands need before their own work (their
caller has checked the tracking store first, as it must before looking up a run to resume):
check the inputs, start or join Ray, tokenize the data on it (Ray Data, into the on-disk
cache), read a ground-truth run, resolve (or train) the base model, and put the weight sets
(and, where actors may not share the cache's filesystem, the tokenized sets) into the object
store once. Along the way it
fingerprints the data and the model; a resumed job refuses in one line if either differs from
the run it continues.

`run_tasks` is the one way tasks run durably: restore those a run already holds (a resumed
job), run the rest on an engine, and store each result in the run as it finishes
(results/task_store.py). The engine starts only if some task is left.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from untrac_ray.engine.data_stage import needs_object_store, share_sets
from untrac_ray.engine.pool import Engine
from untrac_ray.engine.ray_start import ensure_ray
from untrac_ray.inputs.errors import InputError
from untrac_ray.inputs.fingerprints import file_fingerprint, results_key, spec_hash
from untrac_ray.inputs.preflight import check_job
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.methods.tasks import TaskResult
from untrac_ray.results.store import resolve_tracking_uri
from untrac_ray.results.task_store import TaskStore
from untrac_ray.run.job_setup import (
    PreparedData,
    Reporter,
    eval_sample,
    load_ground_truth,
    prepare_data,
    resolve_model,
    weight_sets,
)

SPEC_KEY, DATA_KEY, MODEL_KEY = "spec_key", "data_key", "model_key"  # run tags (fingerprints)


class ResumeError(InputError):
    """A run cannot be resumed with this job (changed spec, data or model)."""


@dataclass
class JobSession:
    """What `run` and `tune` share once set up. `weights` and `tables` are object-store
    references (put once; every engine and trial reads them): `tables` are the tokenized sets'
    descriptors (engine/data_stage.py share_sets)."""

    spec: JobSpec
    uri: str
    data: PreparedData
    model_dir: Path
    checkpoints: list[dict]
    weights: dict[str, ray.ObjectRef]
    tables: dict[str, ray.ObjectRef]
    indices: dict[str, np.ndarray]
    truth: pd.DataFrame | None
    fingerprints: dict[str, str] = field(default_factory=dict)
    resumed_run: str | None = None  # the run this session continues (None: a new run)

    @property
    def n_rows(self) -> dict[str, int]:
        return self.data.n_rows

    @property
    def job_key(self) -> str:
        """What every task of this job shares (task_store keys include it)."""
        return spec_hash(self.fingerprints, self.spec.evaluation.model_dump(mode="json"))

    def engine(self, max_useful_actors: int, actor_options: dict[str, Any] | None = None
               ) -> Engine:
        """A pool of actors over the shared objects."""
        return Engine(self.spec.resources, self.weights, self.tables,
                      self.data.tokenizer.pad_token_id, self.indices,
                      self.spec.evaluation.batch_size,
                      max_useful_actors=max_useful_actors, actor_options=actor_options)

    def task_store(self, run: Any) -> TaskStore:
        """The finished tasks of an MLflow run (tracking.JobRun), spooled under cache_dir."""
        spool = Path(self.spec.cache_dir, "runs", run.run_id, "tasks")
        return TaskStore(run, spool, self.job_key)


def check_resumable(expected: dict[str, str], found: dict[str, str], run_id: str) -> None:
    """ResumeError (one line) if a fingerprint the resumed run recorded differs now."""
    what = {SPEC_KEY: "the job spec", DATA_KEY: "the data", MODEL_KEY: "the base model"}
    for key, label in what.items():
        if key in expected and key in found and expected[key] != found[key]:
            raise ResumeError(f"cannot resume run {run_id}: {label} changed since it ran "
                              f"(fingerprint {expected[key]}, now {found[key]}); run without "
                              "--resume for a new run")


@contextmanager
def open_session(
    spec: JobSpec,
    tracking_uri: str | None = None,
    address: str | None = None,
    reporter: Reporter | None = None,
    *,
    uri: str | None = None,
    spec_key: str | None = None,
    resume: tuple[str, dict[str, str]] | None = None,
    methods: Collection[str] | None = None,
    new_run_if_changed: bool = False,
) -> Iterator[JobSession]:
    """Set up a job (see the module docstring); Ray is shut down after if this started it.

    `resume` is (run id, fingerprints recorded by that run): a difference refuses before the
    work it would waste, or, with `new_run_if_changed`, is reported and the session is for a
    new run (`resumed_run` None). `methods` are those whose weight sets the object store needs
    (TracIn's checkpoints, LDO's initial weights); by default the spec's.
    """
    reporter = reporter or Reporter()
    uri = uri or resolve_tracking_uri(tracking_uri, spec)  # checked by the caller (check_store)
    fingerprints = {SPEC_KEY: spec_key or results_key(spec)}
    run_id, expected = resume if resume is not None else ("", {})

    def check() -> None:
        nonlocal run_id, expected
        try:
            check_resumable(expected, fingerprints, run_id)
        except ResumeError as err:
            if not new_run_if_changed:
                raise
            reporter.stage(f"{err}: starting a new run")
            run_id, expected = "", {}

    check()
    check_job(spec, survey=False)  # bad data, model or cache_dir: one line, before Ray
    started_ray = ensure_ray(spec.resources, address)
    try:
        reporter.stage("loading and tokenizing datasets")
        data = prepare_data(spec, reporter=reporter, checked=True)
        fingerprints[DATA_KEY] = spec_hash({n: s.content_hash for n, s in data.sets.items()})
        check()
        truth = load_ground_truth(spec, uri, data.train, data.test) if spec.ground_truth else None
        model_dir = resolve_model(spec, data, reporter)
        fingerprints[MODEL_KEY] = file_fingerprint(str(model_dir))
        check()
        weights, checkpoints = weight_sets(spec, data, model_dir, methods)
        # Each weight set goes into the object store once, even when several names share it.
        by_id = {id(w): ray.put(w) for w in weights.values()}
        weight_refs = {name: by_id[id(w)] for name, w in weights.items()}
        shared = share_sets(data.sets, needs_object_store(spec.resources))
        set_refs = {name: ray.put(s) for name, s in shared.items()}
        del weights, by_id, shared  # the driver keeps only the references
        yield JobSession(spec, uri, data, model_dir, checkpoints, weight_refs, set_refs,
                         eval_sample(spec, data), truth, fingerprints, run_id or None)
    finally:
        if started_ray:
            ray.shutdown()


def run_tasks(
    session: JobSession,
    store: TaskStore,
    tasks: Sequence[Any],
    on_result: Callable[[TaskResult, bool], None] | None = None,
    on_retry: Callable[[Any, str], None] | None = None,
    engine: Engine | None = None,
    restored: dict[int, TaskResult] | None = None,
) -> tuple[list[TaskResult], int]:
    """Run tasks durably: those `store` holds are restored (or given in `restored`, by
    position), the rest run on `engine` (or a new one, started only if needed) and are stored
    as each finishes. `on_result(result, restored)` sees every result, restored ones first.
    Returns the results in the order of `tasks`, and how many were restored."""
    results: list[TaskResult | None] = [None] * len(tasks)
    restored = store.restore(tasks) if restored is None else restored
    for index, result in restored.items():
        result.index = index  # its position in `tasks`
        results[index] = result
        if on_result is not None:
            on_result(result, True)
    todo = [i for i in range(len(tasks)) if i not in restored]
    if todo:
        def finished(result: TaskResult) -> None:
            result.index = todo[result.index]
            results[result.index] = result
            store.save(result)
            if on_result is not None:
                on_result(result, False)

        if engine is None:
            with session.engine(len(todo)) as own:
                own.map([tasks[i] for i in todo], finished, on_retry=on_retry)
        else:
            engine.map([tasks[i] for i in todo], finished, on_retry=on_retry)
    return results, len(restored)  # type: ignore[return-value]
