"""How many actors of one shape fit on a Ray cluster, node by node.

An actor lives on one node, so a cluster of two nodes with 3 GPUs each holds two actors of
2 GPUs, not three; counting per node keeps the pool from waiting on actors that can never be
scheduled. With `gpus_per_actor: 1` this is one actor per GPU across all nodes. That count is
an upper bound: the pool then reserves its actors' room in placement groups and keeps only
those the cluster can place now (`reserve_actors`), or, on an autoscaling cluster, asks the
autoscaler for all of them. A gang (resources.actors_per_task: N actors running each task
together, gang.py) counts as one actor of N times the resources, and its group holds N
bundles packed on one node.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from untrac_ray.inputs.errors import InputError

_EPS = 1e-9


def actor_slots(
    nodes: Iterable[Mapping[str, float]], cpus_per_actor: float, gpus_per_actor: float
) -> int:
    """Actors needing `cpus_per_actor` CPUs and `gpus_per_actor` GPUs that fit on `nodes`
    (each node's total resources, as in ray.nodes()[i]["Resources"])."""
    total = 0
    for res in nodes:
        fits = [math.floor(res.get("CPU", 0.0) / cpus_per_actor + _EPS)] if cpus_per_actor else []
        if gpus_per_actor > 0:
            fits.append(math.floor(res.get("GPU", 0.0) / gpus_per_actor + _EPS))
        total += min(fits) if fits else 0
    return total


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of each live node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def actor_bundle(cpus_per_actor: float, gpus_per_actor: float) -> dict[str, float]:
    """The resources of one actor, as a placement-group bundle."""
    bundle = {"CPU": float(cpus_per_actor)}
    if gpus_per_actor > 0:
        bundle["GPU"] = float(gpus_per_actor)
    return bundle


@dataclass
class Reservation:
    """The placement groups the pool's actors live in (one group each: a single bundle, or a
    gang's bundles), and how many were asked for."""

    groups: list[Any]
    wanted: int
    autoscale: bool = False

    def release(self) -> None:
        """Give the groups' resources back to the cluster, and withdraw what the autoscaler
        was asked for (a request stays until another replaces it: the cluster would keep
        the nodes added for the job)."""
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            with contextlib.suppress(Exception):  # gone already, with its node
                remove_placement_group(group)
        self.groups = []
        if self.autoscale:
            withdraw_request()


def withdraw_request() -> None:
    """Clear this cluster's standing request to the autoscaler (request_resources)."""
    from ray.autoscaler.sdk import request_resources

    with contextlib.suppress(Exception):  # Ray shut down already: nothing stands
        request_resources(bundles=[])


def reserve_actors(bundle: dict[str, float], wanted: int, fit_timeout_s: float,
                   start_timeout_s: float, autoscale: bool = False,
                   gang_size: int = 1) -> Reservation:
    """Reserve room for up to `wanted` actors of `bundle`, one placement group each; with
    `gang_size` N > 1, for `wanted` gangs of N actors, each group N bundles on one node
    (STRICT_PACK: a gang's collectives stay within the node).

    On a fixed cluster the pool is what can actually be scheduled: the groups placed within
    `fit_timeout_s` are kept and the others removed (resources another holder has, such as a
    submitted driver's entrypoint GPU, are not counted twice). With none placed by then, the
    first one is waited for up to `start_timeout_s`, then UntracError. With `autoscale`, the
    autoscaler is asked for all of them (request_resources) and every group is kept: actors
    start as nodes join.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    strategy = "STRICT_PACK" if gang_size > 1 else "PACK"
    if autoscale:
        from ray.autoscaler.sdk import request_resources

        # a gang's bundles as one: the autoscaler adds nodes that hold a whole gang
        request_resources(bundles=[{k: v * gang_size for k, v in bundle.items()}] * wanted)
    reservation = Reservation([], wanted, autoscale=autoscale)
    try:  # an error or Ctrl-C here leaves no group (and no request) behind
        for _ in range(wanted):
            reservation.groups.append(
                placement_group([dict(bundle)] * gang_size, strategy=strategy))
        if autoscale:
            return reservation
        refs = {g.ready(): g for g in reservation.groups}
        placed, _ = ray.wait(list(refs), num_returns=len(refs), timeout=fit_timeout_s)
        if not placed:
            placed, _ = ray.wait(list(refs), num_returns=1, timeout=start_timeout_s)
    except BaseException:
        reservation.release()
        raise
    kept = [refs[r] for r in refs if r in set(placed)]
    for group in reservation.groups:
        if group not in kept:
            remove_placement_group(group)
    if not kept:
        need = ", ".join(f"{v * gang_size:g} {k}" for k, v in bundle.items())
        one = "one" if gang_size == 1 else f"a gang of {gang_size} actors"
        raise InputError(
            f"no actor could be started in {start_timeout_s:g} s (no node of the Ray cluster "
            f"had {need} free for {one}: other jobs, or this job's driver, hold the rest); on "
            "a cluster that adds nodes on demand, set resources.autoscale with num_actors"
        )
    return Reservation(kept, wanted)
