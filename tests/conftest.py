"""Shared fixtures: one real local Ray cluster per session, tiny jobs written to tmp folders."""

from __future__ import annotations

import copy
import csv
import os
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TRAIN_GROUPS = {
    "add_one": lambda i: (f"What comes after {i}?", str(i + 1)),
    "double": lambda i: (f"Double the number {i}.", str(2 * i)),
    "spell": lambda i: (f"Spell the digits of {i}.", " ".join(str(i))),
}
TEST_GROUPS = {
    "next_number": lambda i: (f"What number follows {i + 50}?", str(i + 51)),
    "twice": lambda i: (f"What is {i + 50} times two?", str(2 * (i + 50))),
}


def write_rows(path: Path, groups: dict, n: int) -> None:
    """A CSV of prompt/target rows with a `dataset` column naming each row's group."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "target", "dataset"])
        for name, make in groups.items():
            for i in range(n):
                writer.writerow([*make(i), name])


def tiny_spec(tmp: Path, n_train_rows: int = 24, n_test_rows: int = 16) -> dict[str, Any]:
    """A small but complete job spec as a mapping (data files written under tmp)."""
    write_rows(tmp / "train.csv", TRAIN_GROUPS, n_train_rows)
    write_rows(tmp / "test.csv", TEST_GROUPS, n_test_rows)
    return {
        "name": "tiny",
        "model": {"config": {
            "model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }},
        "tokenizer": {"kind": "byte", "max_length": 64},
        "training": {"learning_rate": 3e-3, "batch_size": 16, "epochs": 2, "seed": 0},
        "data": {
            "train": [{"name": g, "source": "train.csv", "subset": g} for g in TRAIN_GROUPS],
            "test": [{"name": g, "source": "test.csv", "subset": g} for g in TEST_GROUPS],
        },
        "methods": {
            "untrac": {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 8,
                       "epochs": 1, "eval_every": 1},
            "untrac_inv": {"optimizer": "sgd", "learning_rate": 0.05, "batch_size": 16,
                           "max_steps": 2, "eval_steps": [1, 2]},
        },
        "evaluation": {"batch_size": 16, "max_examples": 20, "seed": 0},
        "resources": {"cpus_per_actor": 1},
        "tracking": {"experiment": "tests"},
        "cache_dir": str(tmp / "cache"),
    }


def merge(base: dict, override: dict) -> dict:
    """A deep copy of base with override's keys set (nested mappings merged, None deletes)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_job(tmp_path: Path):
    """Write a tiny job YAML (with overrides) and return its path."""

    def make(override: dict | None = None, name: str = "job.yaml", **kw) -> Path:
        spec = merge(tiny_spec(tmp_path, **kw), override or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return make


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, started once for the whole test session."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=300 * 2**20, logging_level="ERROR")
    yield ray
    ray.shutdown()
