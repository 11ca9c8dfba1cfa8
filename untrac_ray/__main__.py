"""`python -m untrac_ray`: the `untrac-ray` command."""

from untrac_ray.cli import app

app()
