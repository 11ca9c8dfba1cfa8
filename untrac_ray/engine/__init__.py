"""Placing work on Ray: the pool of actors (each owning a workbench), their placement, gangs
of actors that shard one model, and stop signals. Imports `methods` and below."""
