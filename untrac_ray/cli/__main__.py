"""`python -m untrac_ray.cli`: what a submitted cluster job runs."""

from untrac_ray.cli import app

app()
