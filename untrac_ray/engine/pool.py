"""Placing work on Ray: a pool of actors, each owning one Workbench, fed tasks as they free up.

The base weights go into Ray's object store once; every actor reads them (zero-copy on its
node) and keeps its own model. The tokenized sets travel as small descriptors (data_stage.py):
an actor memory-maps the cache, or reads the arrays the driver put into the object store. The
same code runs on an embedded local Ray and on a cluster address. The engine outlives its
actors: a task whose actor died (a crash, a lost node) runs again on a live one, and a
replacement actor joins when resources allow. With resources.actors_per_task N > 1 each place
in the pool is a gang of N actors running every task together on one sharded model (gang.py),
replaced whole when a member dies.

Starting Ray is ray_start.py; the actor itself, actor.py.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from untrac_ray.compute.modeling import SharedWeights
from untrac_ray.engine.actor import WorkbenchActor
from untrac_ray.engine.gang import (
    ActorGang,
    start_gang,
)
from untrac_ray.engine.placement import (
    Reservation,
    actor_bundle,
    actor_slots,
    alive_node_resources,
    reserve_actors,
)
from untrac_ray.engine.signals import raise_if_stopped
from untrac_ray.inputs.errors import InputError, UntracError
from untrac_ray.inputs.spec_sections import ResourcesSpec
from untrac_ray.inputs.token_store import StoredSet
from untrac_ray.methods.tasks import Task, TaskResult, needs_of


def plan_pool_size(
    resources: ResourcesSpec,
    cluster: dict[str, float],
    max_useful: int,
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> int:
    """How many actors to start: the spec's number, else one per GPU (or CPU slot) in `cluster`;
    with resources.actors_per_task N > 1, how many gangs of N actors (num_actors / N, else as
    many as fit, each counted as one actor of N times the resources on one node).

    With `nodes` (each node's resources) actors are counted node by node, as they are placed.
    Never more than `max_useful` (the most tasks that can run at once) and never fewer than one.
    """
    per = resources.actors_per_task
    cpus, gpus = resources.cpus_per_actor * per, resources.gpus_per_actor * per
    if resources.num_actors is not None:  # with autoscale too: nodes join on demand
        n = resources.num_actors // per
    elif gpus > 0:
        if nodes is not None:
            n = actor_slots(nodes, cpus, gpus)
        else:
            n = math.floor(cluster.get("GPU", 0) / gpus + 1e-9)
        if n == 0:
            where = "has no GPU" if not cluster.get("GPU") else (
                "has no node with that many GPUs and cpus_per_actor CPUs free")
            gang = f" (times actors_per_task: {per}, on one node)" if per > 1 else ""
            raise InputError(
                f"resources.gpus_per_actor: the job asks for {resources.gpus_per_actor} GPU per "
                f"actor{gang} but the Ray cluster {where}"
            )
    elif nodes is not None:
        n = actor_slots(nodes, cpus, 0.0)
    else:
        n = math.floor(cluster.get("CPU", 1) / cpus + 1e-9)
    return max(1, min(n, max_useful))

START_TIMEOUT_S = 600.0

# A dead actor, or the result of its task lost with its node: the task goes to another actor.
_ACTOR_LOST = (RayActorError, ObjectLostError)

# Why a task that reads other tasks' payloads runs again (they are computed again first).
LOST_INPUTS = "the inputs it reads from the object store were lost (their node died)"


@dataclass(eq=False)
class _Slot:
    """One place in the pool: its actor (None once given up; a gang.ActorGang with
    actors_per_task > 1), the pending `prepare` of an actor still starting (None once ready),
    the actor's label, and its failed starts in a row."""

    actor: Any
    prepared: ray.ObjectRef | None
    label: str = ""
    failed_starts: int = 0
    group: Any = None  # the placement group the slot's actors live in (None: a caller's)


@dataclass(eq=False)
class _Call:
    """A task started on an actor: its result, its payload when that stays in the object
    store (None: in the result), and the payloads it reads, by the task that made each."""

    ref: ray.ObjectRef
    payload: ray.ObjectRef | None
    inputs: dict[Task, ray.ObjectRef]


def _start(slot: _Slot, task: Task, shared: dict, needed: dict[Task, ray.ObjectRef],
           producers: dict[Task, str]) -> _Call:
    """Start a task on a slot's actor, with references to the payloads it needs (the actor
    reads them); one missing from `needed` (lost) is computed again on this actor first, and
    the actor noted as its producer. A task whose payload stays in the object store returns it
    as a second object, never fetched."""
    for need in needs_of(task):
        if need not in needed:
            needed[need] = slot.actor.run_kept.remote(need, shared)[1]
            producers[need] = slot.label
    actor = slot.actor
    inputs = {need: needed[need] for need in needs_of(task)}
    if getattr(task, "payload_in_store", False):
        ref, payload = actor.run_kept.remote(task, shared, list(inputs.values()))
        return _Call(ref, payload, inputs)
    return _Call(actor.run.remote(task, shared, list(inputs.values())), None, inputs)


def _forget_lost_inputs(call: _Call, cause: BaseException,
                        needed: dict[Task, ray.ObjectRef]) -> bool:
    """Whether a task failed because payloads it reads were lost (with their node, or with
    the actor computing them); those it was given are dropped from `needed`, to be computed
    again, unless a newer copy replaced them already."""
    if not call.inputs or not isinstance(cause, _ACTOR_LOST):
        return False
    for need, ref in call.inputs.items():
        if needed.get(need) is ref:
            del needed[need]
    return True


def _forget_made_by(label: str, needed: dict[Task, ray.ObjectRef],
                    producers: dict[Task, str]) -> None:
    """Drop the payloads a dead actor made: they lived in its node's object store, and a task
    sent to read them would fail (and lose a retry) before they were computed again."""
    for need in [n for n, who in producers.items() if who == label]:
        needed.pop(need, None)
        del producers[need]


class Engine:
    """A pool of WorkbenchActors. Use as a context manager; `map` runs tasks over the pool.

    The engine, not Ray, recovers from dead actors (actors start with max_restarts=0 unless
    `actor_options` says otherwise): a dead actor is replaced by a new one with the same
    options, which gets tasks once it has built its model; its task goes to a live actor.
    With resources.actors_per_task > 1 the pool's places are gangs (gang.ActorGang), each in
    a placement group of its own, and a gang that lost a member is replaced whole.
    """

    def __init__(
        self,
        resources: ResourcesSpec,
        weights: Mapping[str, SharedWeights | ray.ObjectRef],
        tables: Mapping[str, StoredSet | ray.ObjectRef],
        pad_id: int,
        eval_indices: dict[str, np.ndarray],
        eval_batch_size: int,
        max_useful_actors: int,
        actor_options: dict[str, Any] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.resources = resources
        self.start_timeout_s = start_timeout_s
        # Each weight set goes into the object store once, even when several names share it.
        # Values that are ObjectRefs already (put once by a caller that starts several
        # engines, such as a search's trials) are used as they are.
        by_id = {id(w): _put(w) for w in weights.values()}
        weight_refs = {name: by_id[id(w)] for name, w in weights.items()}
        dataset_refs = {name: _put(table) for name, table in tables.items()}
        wanted = plan_pool_size(resources, ray.cluster_resources(), max_useful_actors,
                                nodes=alive_node_resources())
        # No restarts by Ray: an actor restarted after its node died waits for free resources
        # (held by the surviving actors) forever, and its task with it. The engine replaces
        # dead actors itself and retries their tasks on live ones (map).
        self._options: dict[str, Any] = {
            "num_cpus": resources.cpus_per_actor,
            "num_gpus": resources.gpus_per_actor,
            "max_restarts": 0,
            "max_task_retries": 0,
        }
        self._options.update(actor_options or {})  # e.g. a trial's placement group
        self._args = (pad_id, eval_indices, eval_batch_size, max(1, int(resources.cpus_per_actor)))
        # The driver keeps these references alive as long as the pool (tasks carry them).
        self._shared = {"weights": weight_refs, "datasets": dataset_refs}
        self.gang_size = resources.actors_per_task
        # Room for each actor (or gang) is reserved first (a placement group each), and the
        # pool is what fits; a caller's placement (a trial's group) is used as it is.
        self.reservation: Reservation | None = None
        if "scheduling_strategy" in self._options:
            if self.gang_size > 1:
                raise InputError("resources.actors_per_task: a gang needs a placement group "
                                  "of its own; it cannot run in a caller's")
            groups: list[Any] = [None] * wanted
        else:
            bundle = {**actor_bundle(resources.cpus_per_actor, resources.gpus_per_actor),
                      **self._options.get("resources", {})}  # custom resources asked for
            self.reservation = reserve_actors(
                bundle, wanted, resources.placement_timeout_s, start_timeout_s,
                autoscale=resources.autoscale, gang_size=self.gang_size)
            groups = list(self.reservation.groups)
        self.size = len(groups)
        self._slots: list[_Slot] = []
        try:  # a failure here would leak the groups and actors: __exit__ never runs
            for group in groups:
                self._slots.append(self._start_slot(_Slot(None, None, group=group)))
        except BaseException:
            self.shutdown()
            raise

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def actors(self) -> list[Any]:
        """The pool's actor handles (a replaced actor's successor in its place); with
        actors_per_task > 1, its gangs (gang.ActorGang)."""
        return [slot.actor for slot in self._slots if slot.actor is not None]

    def _start_slot(self, slot: _Slot) -> _Slot:
        """Start an actor (and its `prepare`) in `slot`, in place of the one it had; or a
        gang, in the slot's placement group."""
        settings = {"precision": self.resources.precision, "tf32": self.resources.tf32,
                    "weights_dtype": self.resources.weights_dtype,
                    "gradient_checkpointing": self.resources.gradient_checkpointing}
        if self.gang_size > 1:
            gang = start_gang(WorkbenchActor, self._options, slot.group, self.gang_size,
                              self._shared, *self._args, **settings)
            slot.actor, slot.prepared, slot.label = gang, gang.prepared, ""
            return slot
        options = dict(self._options)
        if slot.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=slot.group, placement_group_bundle_index=0)
        actor = WorkbenchActor.options(**options).remote(*self._args, **settings)
        slot.actor, slot.prepared, slot.label = actor, actor.prepare.remote(self._shared), ""
        return slot

    def _lose(self, slot: _Slot) -> None:
        """Drop a slot's actor (dead, or cut off with its node) and start a replacement."""
        _kill(slot.actor)
        self._start_slot(slot)

    def shutdown(self) -> None:
        """Kill the actors and release the shared objects."""
        for slot in self._slots:
            _kill(slot.actor)
        self._slots = []
        self._shared = {}
        if self.reservation is not None:
            self.reservation.release()

    def wait_ready(self) -> None:
        """Block until every actor has built its model (start-up done); a replacement for a
        dead actor may wait for free resources as long as none come."""
        ray.get([slot.prepared for slot in self._slots if slot.prepared is not None])

    def submit(self, actor_index: int, task: Task) -> ray.ObjectRef:
        """Run one task on the given actor (for callers that keep state on an actor); the
        caller handles its failures (no retry here)."""
        actor = self._slots[actor_index].actor
        if actor is None:
            raise UntracError(f"actor {actor_index} of the pool could not be started")
        return actor.run.remote(task, self._shared)

    def map(
        self,
        tasks: Sequence[Task],
        on_result: Callable[[TaskResult], None] | None = None,
        on_retry: Callable[[Task, str], None] | None = None,
    ) -> list[TaskResult]:
        """Run tasks on the pool as actors free up; results in the order of `tasks`.

        An actor gets a task only once it has built its model. A task whose actor dies (a
        crash, a lost node) goes back to the queue for a live actor, at most
        resources.max_retries times (`on_retry(task, reason)` hears of each); the dead actor is
        replaced, and the replacement joins when it is ready (when resources allow). With no
        ready actor left, the map waits `start_timeout_s` for one. A task that raises an
        UntracError (such as a NaN loss) stops the run with that error. Results already
        returned were handed to on_result and are kept.

        The tasks that `tasks` need (tasks.needs_of) run first, once each, and their payloads
        stay in the object store; a task whose own payload stays there (`payload_in_store`)
        has a reference to it as its result's payload. If a payload a task reads is lost (its
        node died), it is computed again on the task's actor, and the task retried. When an
        actor dies, the payloads it made are dropped at once, so that no task is sent to read
        them; only the task whose actor died counts a retry (a reader that found its inputs
        gone counts none, within one more try per dead actor).
        """
        needed, producers = self._run_needs(tasks, on_retry)
        results: list[TaskResult | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        deaths = [0] * len(tasks)  # the task's own actor died under it
        lost = [0] * len(tasks)  # payloads it read were lost with another actor
        pool_deaths = 0
        idle: list[_Slot] = []
        starting: dict[ray.ObjectRef, _Slot] = {}
        for slot in self._slots:
            if slot.actor is None:
                continue
            if slot.prepared is None:
                idle.append(slot)
            else:
                starting[slot.prepared] = slot
        inflight: dict[ray.ObjectRef, tuple[int, _Slot, _Call]] = {}
        waiting_since: float | None = None  # since when no actor has been ready
        while pending or inflight:
            while idle and pending:
                index = pending.popleft()
                slot = idle.pop()
                call = _start(slot, tasks[index], self._shared, needed, producers)
                inflight[call.ref] = (index, slot, call)
            timeout = None
            if not inflight:  # tasks wait, and no actor is ready to take them
                if not starting:
                    raise UntracError(
                        f"no actor could be started: every actor of the pool died "
                        f"{self.resources.max_retries + 1} times while building its model"
                    )
                waiting_since = waiting_since or time.monotonic()
                timeout = max(0.0, waiting_since + self.start_timeout_s - time.monotonic())
            ready = wait_first([*inflight, *starting], timeout)
            if not ready:
                raise UntracError(self._no_actor_message(sum(r is not None for r in results)))
            (ref,) = ready
            if ref in starting:
                slot = starting.pop(ref)
                if self._started(slot, ref):
                    waiting_since = None
                    idle.append(slot)
                elif slot.actor is not None:
                    starting[slot.prepared] = slot
                continue
            index, slot, call = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as err:
                cause = err.cause
                if isinstance(cause, UntracError):
                    raise type(cause)(str(cause)) from None
                if not _forget_lost_inputs(call, cause, needed):
                    raise UntracError(f"task {describe(tasks[index])} failed: {cause!r}") from None
                # not a retry of its own: the inputs went with an actor whose death costs its
                # own task one; each loss of a producer may cost a reader one more try
                lost[index] += 1
                if lost[index] > pool_deaths + 1:
                    raise UntracError(f"task {describe(tasks[index])} failed: {LOST_INPUTS} "
                                      f"{lost[index]} times") from None
                pending.appendleft(index)
                idle.append(slot)
                if on_retry is not None:
                    on_retry(tasks[index], LOST_INPUTS)
                continue
            except _ACTOR_LOST as err:
                reason = f"actor {slot.label} died ({_death_reason(err)})"
                _forget_made_by(slot.label, needed, producers)
                pool_deaths += 1
                self._lose(slot)
                starting[slot.prepared] = slot
                deaths[index] += 1
                if deaths[index] > self.resources.max_retries:
                    raise UntracError(
                        f"task {describe(tasks[index])} failed: its actor died "
                        f"{deaths[index]} times ({reason})"
                    ) from None
                pending.appendleft(index)
                if on_retry is not None:
                    on_retry(tasks[index], reason)
                continue
            if call.payload is not None:
                result.payload = call.payload
            result.index = index
            results[index] = result
            if on_result is not None:
                on_result(result)
            idle.append(slot)
        return results  # type: ignore[return-value]

    def _run_needs(self, tasks: Sequence[Task], on_retry: Callable[[Task, str], None] | None
                   ) -> tuple[dict[Task, ray.ObjectRef], dict[Task, str]]:
        """Run the tasks that `tasks` need, once each (a map of their own); their payloads
        stay in the object store, and the driver holds only references. Also returns which
        actor (its label) made each payload."""
        needs = list(dict.fromkeys(n for task in tasks for n in needs_of(task)))
        if not needs:
            return {}, {}
        done = self.map(needs, on_retry=on_retry)
        return {r.task: _put(r.payload) for r in done}, {r.task: r.worker for r in done}

    def _started(self, slot: _Slot, ref: ray.ObjectRef) -> bool:
        """Whether the actor whose `prepare` is `ref` is ready; one that died starting is
        replaced (given up after resources.max_retries + 1 failed starts in a row)."""
        try:
            slot.label = ray.get(ref)
        except RayTaskError as err:
            cause = err.cause
            if isinstance(cause, UntracError):
                raise type(cause)(str(cause)) from None
            raise UntracError(f"an actor could not build its model: {cause!r}") from None
        except _ACTOR_LOST:
            slot.failed_starts += 1
            if slot.failed_starts > self.resources.max_retries:
                _kill(slot.actor)
                slot.actor = slot.prepared = None
            else:
                self._lose(slot)
            return False
        slot.prepared, slot.failed_starts = None, 0
        return True

    def _no_actor_message(self, done: int) -> str:
        r, n = self.resources, self.gang_size
        need = f"{r.cpus_per_actor * n:g} CPU" + (f" and {r.gpus_per_actor * n:g} GPU"
                                                  if r.gpus_per_actor else "")
        one = "one" if n == 1 else f"a gang of {n} actors"
        return (f"no actor could be started in {self.start_timeout_s:g} s (no node of the Ray "
                f"cluster had {need} free for {one}; the dead actors' nodes may be gone); "
                f"stopped with {done} tasks finished")


STOP_POLL_S = 1.0  # how often a blocked wait looks for a stop signal whose interrupt was lost


def wait_first(refs: list[ray.ObjectRef], timeout: float | None) -> list[ray.ObjectRef]:
    """ray.wait for the first of refs to be ready (none ready after timeout s: []), in slices
    of STOP_POLL_S; between slices a recorded stop signal is raised again (signals.py)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        raise_if_stopped()
        left = STOP_POLL_S if deadline is None else max(
            0.0, min(STOP_POLL_S, deadline - time.monotonic()))
        ready, _ = ray.wait(refs, num_returns=1, timeout=left)
        if ready or (deadline is not None and time.monotonic() >= deadline):
            return ready


def _kill(actor: Any) -> None:
    if isinstance(actor, ActorGang):
        actor.kill()
    elif actor is not None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already, or its node with it
            pass


def _death_reason(err: BaseException) -> str:
    """One line on why an actor died, from Ray's several-line message (its cause: "The actor
    died because its node has died. ...", "The actor is dead because it was killed by ...")."""
    if isinstance(err, ObjectLostError):
        return "its task's result was lost with its node"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    starts = ("The actor died because", "The actor is dead because")
    at = next((i for i, line in enumerate(lines) if line.startswith(starts)), None)
    if at is None:
        return lines[0] if lines else type(err).__name__
    text = "; ".join([lines[at].split(" because ", 1)[1], *lines[at + 1:]])
    text = text.split(" Some common causes")[0].strip()
    text = re.sub(r"\b([0-9a-f]{8})[0-9a-f]{16,}\b", r"\1", text)  # ids: their first 8 digits
    return text if len(text) <= 200 else text[:199] + "…"


def _put(value: Any) -> ray.ObjectRef:
    """A value into the object store, unless it is a reference to one already."""
    return value if isinstance(value, ray.ObjectRef) else ray.put(value)


def describe(task: Task) -> str:
    """A short name for a task in messages."""
    if hasattr(task, "forget"):
        return f"{task.method}:{task.forget}"
    if hasattr(task, "left_out"):
        return f"ldo:{task.left_out or '(all)'}:seed{task.seed}"
    if hasattr(task, "kept"):
        return f"lds:subset{task.subset}:seed{task.seed}"
    if hasattr(task, "dataset"):
        return f"gradient:{task.dataset}@{task.weights}"
    if hasattr(task, "datasets"):
        return "base-eval:" + ",".join(task.datasets)
    return type(task).__name__
