"""The `untrac-ray` command line: it parses, calls the layers below, and prints. Nothing
more. `app` is the Typer application (the console script and `python -m untrac_ray.cli`)."""

from untrac_ray.cli.main import app

__all__ = ["app"]
