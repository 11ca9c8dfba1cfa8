"""SIGTERM handled as Ctrl-C: what Kubernetes, Slurm and `timeout` send to stop a job.

Inside `sigterm_as_interrupt()`, SIGTERM raises `Terminated`, a KeyboardInterrupt, so a job
stops the way Ctrl-C stops it (Ray may turn it into a plain KeyboardInterrupt on the way out,
so the CLI asks `was_terminated()`): the MLflow run ends KILLED with the partial table, the actors
are shut down, and the CLI exits with 143 (128 + SIGTERM). `ray.init` installs its own SIGTERM
handler in the driver (it exits through Ray's crash handler, which prints a stack dump);
`engine.ensure_ray` puts the caller's handler back after it.

SIGINT (Ctrl-C, and what `stop` sends a cluster job) raises KeyboardInterrupt as Python's own
handler does, but is installed whatever the process inherited: a process started by `cmd &` in
a script inherits SIGINT ignored, and so do a Ray head started that way and every job driver it
starts, which then ignored `stop` until Ray killed it with the run left RUNNING. Both handlers
also record the signal, and `raise_if_stopped()` raises it again: an exception raised at an
arbitrary point can be lost (in a finalizer, or swallowed by a library), so the engine's waits
look for a recorded stop between slices and end the job anyway.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


_received: list[int] = []  # the SIGTERMs received: Ray may re-raise a plain KeyboardInterrupt
_pending: list[int] = []  # the stop signals received inside the block, SIGTERM or SIGINT


def _record_and_raise(signum: int, frame) -> None:
    if signum == signal.SIGTERM:
        _received.append(signum)
    _pending.append(signum)
    raise_if_stopped()


def raise_if_stopped() -> None:
    """Raise the stop signal received inside sigterm_as_interrupt() again, if there was one
    (Terminated for SIGTERM, KeyboardInterrupt for SIGINT); nothing otherwise."""
    if _pending:
        if _pending[-1] == signal.SIGTERM:
            raise Terminated("terminated by SIGTERM")
        raise KeyboardInterrupt


def was_terminated() -> bool:
    """True once this process received SIGTERM inside sigterm_as_interrupt()."""
    return bool(_received)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated and SIGINT KeyboardInterrupt, and both are
    recorded for raise_if_stopped() (the previous handlers come back after)."""
    _pending.clear()
    previous_term = signal.signal(signal.SIGTERM, _record_and_raise)
    previous_int = signal.signal(signal.SIGINT, _record_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        _pending.clear()
