"""The actor: `WorkbenchActor`, a Ray actor around one Workbench (or, in a gang, one rank's
ShardedWorkbench), built from the weight sets in Ray's object store and the tokenized sets
(memory-mapped or from the object store: data_stage.py).
`workbench_from_refs` builds the same bench in any Ray worker (a trial's own process too).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

from untrac_ray.compute.memory import return_freed_memory
from untrac_ray.compute.modeling import SharedWeights
from untrac_ray.compute.precision import configure_tf32
from untrac_ray.engine.data_stage import open_shared
from untrac_ray.engine.gang import (
    RankRunner,
    rendezvous_address,
    take_listener,
)
from untrac_ray.engine.sharded import Gang, ShardedWorkbench, init_gang
from untrac_ray.methods.tasks import Task, TaskResult
from untrac_ray.methods.workbench import Workbench


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


def workbench_from_refs(
    shared: Mapping[str, Mapping[str, ray.ObjectRef]],
    pad_id: int,
    eval_indices: dict[str, np.ndarray],
    eval_batch_size: int,
    device: torch.device | str,
    precision: str = "fp32",
    weights_dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    gang: Gang | None = None,
) -> Workbench | ShardedWorkbench:
    """A Workbench built from object-store references, in a Ray worker (an actor, a trial);
    with `gang`, this rank's ShardedWorkbench of the gang (every rank builds one; `device`
    is the gang's, and the memory settings must be the defaults: resources' validation).

    `shared` holds {"weights": {name: ref to SharedWeights}, "datasets": {name: ref to a
    token_store.StoredSet}} (refs nested in a dict reach a remote call unresolved). The sets
    are opened now (memory-mapped from the cache, or from the object store: data_stage.py);
    each weight set on first use (zero-copy on the node). `precision` is every
    task's numerics; `weights_dtype` and `gradient_checkpointing` the model's memory settings
    (ResourcesSpec).
    """
    weights = _ObjectStoreWeights(dict(shared["weights"]))
    names = list(shared["datasets"])
    stored = ray.get([shared["datasets"][n] for n in names])
    datasets = {n: open_shared(s, pad_id) for n, s in zip(names, stored, strict=True)}
    if gang is not None:
        if weights_dtype != "fp32" or gradient_checkpointing:
            raise ValueError("a sharded bench keeps fp32 weights, without gradient "
                             "checkpointing")
        return ShardedWorkbench(weights, datasets, eval_indices, eval_batch_size, gang,
                                precision=precision)
    return Workbench(weights, datasets, eval_indices, eval_batch_size, device,
                     precision=precision, weights_dtype=weights_dtype,
                     gradient_checkpointing=gradient_checkpointing)


@ray.remote
class WorkbenchActor:
    """A Ray actor around one Workbench; it builds its model from the shared weights once.

    The object-store references (weights, tokenized sets) reach the actor through method
    calls, never its constructor: Ray cannot restart an actor whose constructor arguments live
    in the object store (ray-project/ray#53727). `prepare` builds the Workbench right after
    start (the engine gives an actor tasks only once it has); `run` builds it too, for tasks
    sent with `Engine.submit` straight after start.

    A member of a gang (gang.py) starts with `join_gang` instead of `prepare`: its bench is
    then its rank's ShardedWorkbench, and its gang work runs through its RankRunner.
    """

    def __init__(
        self,
        pad_id: int,
        eval_indices: dict[str, np.ndarray],
        eval_batch_size: int,
        threads: int,
        precision: str = "fp32",
        tf32: bool = False,
        weights_dtype: str = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        torch.set_num_threads(threads)
        return_freed_memory()  # the actor's resident set stays what compute/memory.py counts
        warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecations
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        configure_tf32(tf32, self.device)
        self.pad_id, self.eval_indices, self.eval_batch_size = pad_id, eval_indices, eval_batch_size
        self.precision = precision
        self.memory = {"weights_dtype": weights_dtype,
                       "gradient_checkpointing": gradient_checkpointing}
        self.bench: Workbench | ShardedWorkbench | None = None
        self.label = f"{ray.get_runtime_context().get_node_id()[:8]}/pid{os.getpid()}/{self.device}"
        self.gang: Gang | None = None
        self.rank: RankRunner | None = None

    def prepare(self, shared: dict[str, dict[str, ray.ObjectRef]]) -> str:
        """Build the Workbench from the shared objects; returns the actor's label (node/pid)."""
        if self.bench is None:
            self.bench = workbench_from_refs(shared, self.pad_id, self.eval_indices,
                                             self.eval_batch_size, self.device, self.precision,
                                             **self.memory, gang=self.gang)
        return self.label

    def gang_address(self) -> tuple[str, int]:
        """Where this actor, as rank 0 of a gang, will listen for the others (gang.py)."""
        return rendezvous_address()

    def join_gang(self, rank: int, world_size: int, address: tuple[str, int],
                  shared: dict[str, dict[str, ray.ObjectRef]],
                  peers: Sequence[ray.ObjectRef] = ()) -> str:
        """Join a gang as rank `rank` of `world_size` (rank 0 listens at `address`) and build
        this rank's ShardedWorkbench; returns the label. Rank 0 watches the others' joins
        (`peers`)."""
        self.rank = RankRunner(rank, world_size)

        def join() -> str:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if self.device == "cuda" else torch.device("cpu")  # Ray's GPU: an index
            listen_fd = take_listener(address[1]) if rank == 0 else None
            self.gang = init_gang(rank, world_size, *address, device=device, listen_fd=listen_fd)
            self.label += f"/rank{rank}of{world_size}"
            return self.prepare(shared)

        return self.rank.run(join, peers)

    def run(self, task: Task, shared: dict[str, dict[str, ray.ObjectRef]],
            inputs: Sequence[ray.ObjectRef] = (), peers: Sequence[ray.ObjectRef] = ()
            ) -> TaskResult | None:
        """Run a task; `inputs` refer to the payloads of the tasks it needs, read here from the
        object store (zero-copy on this node). A gang's members all run it, rank 0 watching
        the others' calls (`peers`); only rank 0 returns the result (None from the others)."""
        if self.rank is not None:
            result = self.rank.run(lambda: self._run_here(task, shared, inputs), peers)
            return result if self.rank.rank == 0 else None
        return self._run_here(task, shared, inputs)

    def _run_here(self, task: Task, shared: dict[str, dict[str, ray.ObjectRef]],
                 inputs: Sequence[ray.ObjectRef] = ()) -> TaskResult:
        """`run` on this actor's bench."""
        self.prepare(shared)
        result = self.bench.run(task, ray.get(list(inputs))) if inputs else self.bench.run(task)
        result.worker = self.label
        return result

    @ray.method(num_returns=2)
    def run_kept(self, task: Task, shared: dict[str, dict[str, ray.ObjectRef]],
                 inputs: Sequence[ray.ObjectRef] = (), peers: Sequence[ray.ObjectRef] = ()
                 ) -> tuple[TaskResult, Any]:
        """`run`, for a task whose payload stays in the object store: the result without its
        payload, and the payload as a second object (the driver keeps only its reference)."""
        result = self.run(task, shared, inputs, peers)
        payload, result.payload = result.payload, None
        return result, payload


# How long a map waits for an actor to start (and build its model) when it has none ready:
