"""Submitting jobs to a Ray cluster through the Ray Jobs API, and watching them."""
