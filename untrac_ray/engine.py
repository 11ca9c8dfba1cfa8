"""Placing work on Ray: a pool of actors, each owning one Workbench, fed tasks as they free up.

The base weights and the tokenized datasets go into Ray's object store once; every actor reads
them (zero-copy on its node) and keeps its own model. The same code runs on an embedded local
Ray and on a cluster address.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from untrac_ray.errors import UntracError
from untrac_ray.modeling import SharedWeights
from untrac_ray.placement import actor_slots, alive_node_resources
from untrac_ray.precision import configure_tf32
from untrac_ray.spec import ResourcesSpec
from untrac_ray.tasks import Task
from untrac_ray.tokenization import TokenizedSet
from untrac_ray.workbench import TaskResult, Workbench


def ensure_ray(resources: ResourcesSpec, address: str | None = None) -> bool:
    """Connect to a cluster or start an embedded local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    # ray.init replaces the driver's SIGTERM handler with its own (an exit through Ray's crash
    # handler); a handler the caller installed (signals.py) is put back after it.
    sigterm = signal.getsignal(signal.SIGTERM)
    address = address or resources.address
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        mem = resources.object_store_memory_mb
        ray.init(
            address="local",  # always a new embedded instance, even if `ray start` ran here
            num_cpus=resources.local_cpus or os.cpu_count(),
            object_store_memory=mem * 2**20 if mem else None,
            include_dashboard=False,
            **kwargs,
        )
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True


def plan_pool_size(
    resources: ResourcesSpec,
    cluster: dict[str, float],
    max_useful: int,
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> int:
    """How many actors to start: the spec's number, else one per GPU (or CPU slot) in `cluster`.

    With `nodes` (each node's resources) actors are counted node by node, as they are placed.
    Never more than `max_useful` (the most tasks that can run at once) and never fewer than one.
    """
    if resources.num_actors is not None:
        n = resources.num_actors
    elif resources.gpus_per_actor > 0:
        if nodes is not None:
            n = actor_slots(nodes, resources.cpus_per_actor, resources.gpus_per_actor)
        else:
            n = math.floor(cluster.get("GPU", 0) / resources.gpus_per_actor + 1e-9)
        if n == 0:
            where = "has no GPU" if not cluster.get("GPU") else (
                "has no node with that many GPUs and cpus_per_actor CPUs free")
            raise UntracError(
                f"resources.gpus_per_actor: the job asks for {resources.gpus_per_actor} GPU per "
                f"actor but the Ray cluster {where}"
            )
    elif nodes is not None:
        n = actor_slots(nodes, resources.cpus_per_actor, 0.0)
    else:
        n = math.floor(cluster.get("CPU", 1) / resources.cpus_per_actor + 1e-9)
    return max(1, min(n, max_useful))


class _ObjectStoreWeights(Mapping):
    """Weight sets read from Ray's object store on first use (zero-copy on the node)."""

    def __init__(self, refs: dict[str, ray.ObjectRef]) -> None:
        self._refs = refs
        self._loaded: dict[str, SharedWeights] = {}

    def __getitem__(self, name: str) -> SharedWeights:
        if name not in self._loaded:
            self._loaded[name] = ray.get(self._refs[name])
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)


@ray.remote
class WorkbenchActor:
    """A Ray actor around one Workbench; it builds its model from the shared weights once.

    The object-store references (weights, tokenized tables) reach the actor through method
    calls, never its constructor: Ray cannot restart an actor whose constructor arguments live
    in the object store (ray-project/ray#53727). `prepare` builds the Workbench right after
    start; `run` builds it too when a restarted actor (a crash) gets a retried task first.
    """

    def __init__(
        self,
        pad_id: int,
        eval_indices: dict[str, np.ndarray],
        eval_batch_size: int,
        threads: int,
        precision: str = "fp32",
        tf32: bool = False,
    ) -> None:
        torch.set_num_threads(threads)
        warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecations
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        configure_tf32(tf32, self.device)
        self.pad_id, self.eval_indices, self.eval_batch_size = pad_id, eval_indices, eval_batch_size
        self.precision = precision
        self.bench: Workbench | None = None
        self.label = f"{ray.get_runtime_context().get_node_id()[:8]}/pid{os.getpid()}/{self.device}"

    def prepare(self, shared: dict[str, dict[str, ray.ObjectRef]]) -> None:
        """Build the Workbench from the shared objects (refs nested in a dict arrive unresolved:
        the weights are read from the object store on first use, zero-copy on the node)."""
        if self.bench is not None:
            return
        weights = _ObjectStoreWeights(shared["weights"])
        names = list(shared["datasets"])
        tables = ray.get([shared["datasets"][n] for n in names])
        datasets = {
            n: TokenizedSet.from_table(n, t, self.pad_id)
            for n, t in zip(names, tables, strict=True)
        }
        self.bench = Workbench(weights, datasets, self.eval_indices, self.eval_batch_size,
                               self.device, precision=self.precision)  # every task's numerics

    def run(self, task: Task, shared: dict[str, dict[str, ray.ObjectRef]]) -> TaskResult:
        self.prepare(shared)
        result = self.bench.run(task)
        result.worker = self.label
        return result


class Engine:
    """A pool of WorkbenchActors. Use as a context manager; `map` runs tasks over the pool."""

    def __init__(
        self,
        resources: ResourcesSpec,
        weights: Mapping[str, SharedWeights | ray.ObjectRef],
        tables: Mapping[str, pa.Table | ray.ObjectRef],
        pad_id: int,
        eval_indices: dict[str, np.ndarray],
        eval_batch_size: int,
        max_useful_actors: int,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        self.resources = resources
        # Each weight set goes into the object store once, even when several names share it.
        # Values that are ObjectRefs already (put once by a caller that starts several
        # engines, such as a search's trials) are used as they are.
        by_id = {id(w): _put(w) for w in weights.values()}
        weight_refs = {name: by_id[id(w)] for name, w in weights.items()}
        dataset_refs = {name: _put(table) for name, table in tables.items()}
        self.size = plan_pool_size(resources, ray.cluster_resources(), max_useful_actors,
                                   nodes=alive_node_resources())
        threads = max(1, int(resources.cpus_per_actor))
        options = {
            "num_cpus": resources.cpus_per_actor,
            "num_gpus": resources.gpus_per_actor,
            "max_restarts": resources.max_retries,
            "max_task_retries": resources.max_retries,
        }
        if resources.gpus_per_actor > 0:
            options["scheduling_strategy"] = "SPREAD"
        options.update(actor_options or {})  # e.g. a trial's placement group
        # The driver keeps these references alive as long as the pool (tasks carry them).
        self._shared = {"weights": weight_refs, "datasets": dataset_refs}
        self.actors = [
            WorkbenchActor.options(**options).remote(
                pad_id, eval_indices, eval_batch_size, threads,
                precision=resources.precision, tf32=resources.tf32,
            )
            for _ in range(self.size)
        ]
        self._prepared = [actor.prepare.remote(self._shared) for actor in self.actors]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Kill the actors and release the shared objects."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self._prepared = []
        self._shared = {}

    def wait_ready(self) -> None:
        """Block until every actor has built its model (start-up done)."""
        ray.get(self._prepared)

    def submit(self, actor_index: int, task: Task) -> ray.ObjectRef:
        """Run one task on the given actor (for callers that keep state on an actor)."""
        return self.actors[actor_index].run.remote(task, self._shared)

    def map(
        self, tasks: Sequence[Task], on_result: Callable[[TaskResult], None] | None = None
    ) -> list[TaskResult]:
        """Run tasks on the pool as actors free up; results in the order of `tasks`.

        A task whose actor dies is retried by Ray (max_retries); a task that raises an
        UntracError (such as a NaN loss) stops the run with that error. Results already
        returned were handed to on_result and are kept.
        """
        results: list[TaskResult | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        idle = list(self.actors)
        inflight: dict[ray.ObjectRef, tuple[int, Any]] = {}
        while pending or inflight:
            while idle and pending:
                index = pending.popleft()
                actor = idle.pop()
                inflight[actor.run.remote(tasks[index], self._shared)] = (index, actor)
            (ready,), _ = ray.wait(list(inflight), num_returns=1)
            index, actor = inflight.pop(ready)
            try:
                result = ray.get(ready)
            except RayTaskError as err:
                cause = err.cause
                if isinstance(cause, UntracError):
                    raise type(cause)(str(cause)) from None
                raise UntracError(f"task {describe(tasks[index])} failed: {cause!r}") from None
            except RayActorError as err:
                raise UntracError(
                    f"task {describe(tasks[index])} failed: its actor died "
                    f"{self.resources.max_retries + 1} times ({str(err).splitlines()[0]})"
                ) from None
            result.index = index
            results[index] = result
            if on_result is not None:
                on_result(result)
            idle.append(actor)
        return results  # type: ignore[return-value]


def _put(value: Any) -> ray.ObjectRef:
    """A value into the object store, unless it is a reference to one already."""
    return value if isinstance(value, ray.ObjectRef) else ray.put(value)


def describe(task: Task) -> str:
    """A short name for a task in messages."""
    if hasattr(task, "forget"):
        return f"{task.method}:{task.forget}"
    if hasattr(task, "left_out"):
        return f"ldo:{task.left_out or '(all)'}:seed{task.seed}"
    if hasattr(task, "dataset"):
        return f"gradient:{task.dataset}@{task.weights}"
    if hasattr(task, "datasets"):
        return "base-eval:" + ",".join(task.datasets)
    return type(task).__name__
