"""Starting Ray or joining a cluster: `ensure_ray` connects to the spec's (or the CLI's)
address, or starts an embedded local Ray that listens on loopback only; the caller's SIGTERM
handler survives ray.init.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import ray

from untrac_ray.inputs.spec_sections import ResourcesSpec

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let the embedded node take 127.0.0.1 as its address, so that GCS, raylet, workers and
    agents listen on loopback only. Ray turns a loopback node address into the machine's
    network address unless its multi-node switch is off (the one RAY_ENABLE_WINDOWS_OR_OSX_
    CLUSTER sets when Ray is imported); it is off only while the node starts. A cluster
    address never goes through here. tests/test_security.py checks every listening socket."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


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
        with _loopback_node():
            ray.init(
                address="local",  # always a new embedded instance, even if `ray start` ran
                num_cpus=resources.local_cpus or os.cpu_count(),
                object_store_memory=mem * 2**20 if mem else None,
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                dashboard_host=LOOPBACK,
                **kwargs,
            )
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True
