"""Gangs on Ray: N actors that run every task together on one model sharded over them
(resources.actors_per_task: N; the PyTorch side is sharded.py), for models larger than one GPU.

To the engine's pool a gang is one actor (one slot of engine.Engine): it gets one task at a
time, and a gang that loses a member is killed whole and replaced, its task retried, as a
dead actor is. This module holds the mechanics:

- Placement: each gang lives in a placement group of N bundles (the actor's CPUs and GPUs)
  packed on one node (placement.reserve_actors with gang_size N), so that NCCL stays within
  the node; member r is scheduled in bundle r. Ray gives each GPU actor its GPU as cuda:0.
- Rendezvous (`start_gang`): rank 0's actor opens a socket on its node's address (only
  there: on loopback for an embedded Ray) and reports it (`rendezvous_address`); every member
  then joins the torch.distributed group with it, rank 0's store taking the socket over, and
  builds its ShardedWorkbench (WorkbenchActor.join_gang). The driver never blocks: the
  address reaches the members as an object reference.
- Dispatch (`ActorGang`): each task goes to every member, in the same order; rank 0's call is
  sent last, with references to the other members' calls of the same task, and only rank 0
  returns the result (all ranks compute the same).
- Failure (`RankRunner`): a collective blocks as long as any rank is missing, so a member
  never waits on a dead peer. Each member runs the gang's work in a thread of its own while
  rank 0's actor thread watches the other members' calls: when one died, rank 0 leaves
  (its process exits), and the engine sees the gang's task lost with its actor; when one
  raised, rank 0 raises that error. An error of rank 0's own work first waits briefly for a
  member's death (gloo raises as soon as a peer's connection closes), so that a lost member
  is told apart from a real error. The engine then kills the other members (`kill`).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

__all__ = ["ActorGang", "RankRunner", "rendezvous_address", "start_gang", "take_listener"]

# A member whose call ended this way is gone (its process, or its node, died).
MEMBER_LOST = (RayActorError, ObjectLostError)

# How often rank 0 looks at the other members' calls while its own work runs, and how long an
# error of its own waits for a member's death to show (Ray reports a dead process within a
# second or two).
POLL_S = 0.2
DEATH_GRACE_S = 10.0


# --- The actor side ---


# Rank 0's rendezvous sockets, listening from rendezvous_address until rank 0 joins.
_LISTENING: dict[int, socket.socket] = {}


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a port on it where rank 0 listens for the others: a socket
    bound to that address only, kept listening (`take_listener`) until rank 0 joins."""
    host = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen()
    port = sock.getsockname()[1]
    _LISTENING[port] = sock
    return host, port


def take_listener(port: int) -> int:
    """The file descriptor of the socket rendezvous_address left listening on `port`, for
    sharded.init_gang (its store takes the socket over)."""
    return _LISTENING.pop(port).detach()


def _died(ref: ray.ObjectRef) -> bool:
    """Whether a finished call failed because its actor is gone."""
    try:
        ray.get(ref)
    except MEMBER_LOST:
        return True
    except RayTaskError:
        return False
    return False


class RankRunner:
    """One member's place in its gang (rank `rank`), and the thread its gang work runs in.

    `run(work, peers)` runs `work` in that thread (the same thread every time: CUDA's current
    device and the process group's state stay with it) and returns its result. With `peers`,
    the other members' calls of the same work (rank 0), it watches them meanwhile: a member's
    death ends this process (`leave`), a member's error is raised here.

    After an error the gang's ranks may be out of step (one raised, another waits in a
    collective), so the next call leaves at once: the engine replaces the gang before it
    runs anything else.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gang")
        self.failed = False

    def run(self, work: Callable[[], Any], peers: Sequence[ray.ObjectRef] = ()) -> Any:
        if self.failed:
            self.leave("an earlier call of its gang failed: its ranks may be out of step")
        future = self.thread.submit(work)
        pending = list(peers)
        while pending and not future.done():
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in ready:
                try:
                    ray.get(ref)
                except MEMBER_LOST as err:
                    self.leave(err)
                except RayTaskError as err:  # the same error on every rank, or that rank's own
                    self.leave_if_one_dies(pending)
                    self.failed = True
                    raise (err.cause or err) from None
        error = future.exception()
        if error is not None:
            self.leave_if_one_dies(pending)
            self.failed = True
            raise error
        return future.result()

    def leave_if_one_dies(self, pending: list[ray.ObjectRef]) -> None:
        """Wait up to DEATH_GRACE_S for the pending calls: leave if one's member died. Calls
        still running then (their members blocked in a collective) are not waited for."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while pending and time.monotonic() < deadline:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                if _died(ref):
                    self.leave(f"another member of its gang died with the call {ref.hex()[:8]}")

    def leave(self, why: Any) -> None:
        """End this process: its gang lost a member, and the work it would wait for (in a
        collective, in its thread) will not come. The engine replaces the whole gang."""
        lines = [line.strip() for line in str(why).splitlines() if line.strip()]
        print(f"gang rank {self.rank} of {self.world_size} leaves: {'; '.join(lines)[:300]}",
              file=sys.stderr, flush=True)
        os._exit(1)


# --- The driver side ---


class _GangMethod:
    """An actor method of the gang (`run` or `run_kept`), called as an actor's is:
    `.remote(...)` sends it to every member and returns rank 0's reference(s)."""

    def __init__(self, members: Sequence[Any], name: str) -> None:
        self.members, self.name = members, name

    def remote(self, *args: Any) -> Any:
        peers = [m.run.remote(*args) for m in self.members[1:]]
        return getattr(self.members[0], self.name).remote(*args, peers=peers)


class ActorGang:
    """A started gang as the engine's pool sees it: an actor with `run` and `run_kept`
    (rank 0's result), `prepared` (rank 0's join: its label, once every member has joined and
    built its bench), and `kill` for all its members. `address` is rank 0's rendezvous
    (host, port), as a reference."""

    def __init__(self, members: list[Any], address: ray.ObjectRef,
                 prepared: ray.ObjectRef) -> None:
        self.members = members
        self.address = address
        self.prepared = prepared
        self.run = _GangMethod(members, "run")
        self.run_kept = _GangMethod(members, "run_kept")

    def kill(self) -> None:
        """Kill every member (the others of a broken gang wait in a collective forever)."""
        for member in self.members:
            try:
                ray.kill(member, no_restart=True)
            except Exception:  # noqa: BLE001 - gone already, or its node with it
                pass


def start_gang(actor_class: Any, options: dict[str, Any], group: Any, size: int,
               shared: dict[str, Any], *args: Any, **kwargs: Any) -> ActorGang:
    """Start `size` actors of `actor_class` (a WorkbenchActor: `gang_address`, `join_gang`,
    `run`, `run_kept`) with `options` and constructor arguments `args`, `kwargs`, member r in
    bundle r of the placement `group`, and have them join one gang and build their benches
    from the `shared` objects. Returns at once; the gang is ready when `prepared` is."""
    members = [
        actor_class.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=rank)).remote(*args, **kwargs)
        for rank in range(size)
    ]
    address = members[0].gang_address.remote()  # resolved before each member's join runs
    peers = [m.join_gang.remote(rank, size, address, shared)
             for rank, m in enumerate(members[1:], start=1)]
    prepared = members[0].join_gang.remote(0, size, address, shared, peers=peers)
    return ActorGang(members, address, prepared)
