"""Errors that untrac-ray reports to users as one clear line."""

from __future__ import annotations

from untrac_ray.inputs.redaction import redact


class UntracError(Exception):
    """Base class for user-facing errors; the CLI prints the message and exits non-zero.

    The message never holds a credential: it is redacted when made (a URI's password, a
    token in its query, any secret this process learnt)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class SpecError(UntracError):
    """The job spec is invalid (a key is missing, has a bad value, or names a bad file)."""


class DataError(UntracError):
    """A dataset cannot be loaded: missing file, missing column, no rows, unknown subset."""


class ModelError(UntracError):
    """A model cannot be built or loaded (for example a folder without weights)."""


class NonFiniteLossError(UntracError):
    """The loss became NaN or infinite during gradient ascent."""


class TrackingError(UntracError):
    """The MLflow tracking store cannot be used or read."""


class RunAdopted(TrackingError):
    """Another driver took over this driver's MLflow run (`--resume` found it silent)."""
