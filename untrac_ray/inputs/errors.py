"""Errors that untrac-ray reports to users as one clear line, and the exit code each gives:
2 for bad input or usage (found before any work, or the store or cluster it names cannot be
used), 1 for a job that failed while it ran (docs/cli.md has the table)."""

from __future__ import annotations

from untrac_ray.inputs.redaction import redact


class UntracError(Exception):
    """Base class for user-facing errors; the CLI prints the message and exits with
    `exit_code`: 1 here, a job that failed while it ran (a task failed, a loss became NaN).

    The message never holds a credential: it is redacted when made (a URI's password, a
    token in its query, any secret this process learnt)."""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class InputError(UntracError):
    """Bad input or usage: what the user gave cannot work (exit code 2)."""

    exit_code = 2


class SpecError(InputError):
    """The job spec is invalid (a key is missing, has a bad value, or names a bad file)."""


class DataError(InputError):
    """A dataset cannot be loaded: missing file, missing column, no rows, unknown subset."""


class ModelError(InputError):
    """A model cannot be built or loaded (for example a folder without weights)."""


class NonFiniteLossError(UntracError):
    """The loss became NaN or infinite during gradient ascent."""


class TrackingError(InputError):
    """The MLflow tracking store cannot be used or read, or has no run to resume."""


class StoreLost(TrackingError):
    """The store stopped taking a running job's results (exit code 1: they are kept locally
    and `run --resume` stores them)."""

    exit_code = 1


class RunAdopted(TrackingError):
    """Another driver took over this driver's MLflow run (`--resume` found it silent)."""

    exit_code = 1
