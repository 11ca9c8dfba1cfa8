"""Tables, scores, figures and MLflow (the only layer that imports it): the tidy influence
table and its matrices, scores against the ground truth, figures, finished tasks kept for
`--resume`, runs written and read back, and what the browsing commands compute.

`untrac_ray.results.read_influence(run_id, tracking_uri)` reads the table a run logged."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # the public reader, without importing MLflow up front
    if name == "read_influence":
        from untrac_ray.results.runs import read_influence

        return read_influence
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
