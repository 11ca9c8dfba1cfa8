"""How many actors of one shape fit on a Ray cluster, node by node.

An actor lives on one node, so a cluster of two nodes with 3 GPUs each holds two actors of
2 GPUs, not three; counting per node keeps the pool from waiting on actors that can never be
scheduled. With `gpus_per_actor: 1` this is one actor per GPU across all nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

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
