"""SIGTERM handled as Ctrl-C: what Kubernetes, Slurm and `timeout` send to stop a job.

Inside `sigterm_as_interrupt()`, SIGTERM raises `Terminated`, a KeyboardInterrupt, so a job
stops the way Ctrl-C stops it (Ray may turn it into a plain KeyboardInterrupt on the way out,
so the CLI asks `was_terminated()`): the MLflow run ends KILLED with the partial table, the actors
are shut down, and the CLI exits with 143 (128 + SIGTERM). `ray.init` installs its own SIGTERM
handler in the driver (it exits through Ray's crash handler, which prints a stack dump);
`engine.ensure_ray` puts the caller's handler back after it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


_received: list[int] = []  # the SIGTERMs received: Ray may re-raise a plain KeyboardInterrupt


def _raise_terminated(signum: int, frame) -> None:
    _received.append(signum)
    raise Terminated("terminated by SIGTERM")


def was_terminated() -> bool:
    """True once this process received SIGTERM inside sigterm_as_interrupt()."""
    return bool(_received)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (the previous handler comes back after)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
