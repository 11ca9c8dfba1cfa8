"""Shared fixtures: one real local Ray cluster per session, tiny jobs written to tmp folders."""

from __future__ import annotations

import copy
import csv
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import ray
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A command a test runs as a process (`python -m untrac_ray.cli ...`) imports this checkout's
# package, not whichever checkout the environment has installed.
_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _ROOT)])

TRAIN_GROUPS = {
    "add_one": lambda i: (f"What comes after {i}?", str(i + 1)),
    "double": lambda i: (f"Double the number {i}.", str(2 * i)),
    "spell": lambda i: (f"Spell the digits of {i}.", " ".join(str(i))),
}
TEST_GROUPS = {
    "next_number": lambda i: (f"What number follows {i + 50}?", str(i + 51)),
    "twice": lambda i: (f"What is {i + 50} times two?", str(2 * (i + 50))),
}


# Real data come in sets of different sizes: the fixtures' sets are unequal by default (as
# fractions of n_train_rows / n_test_rows), and the model has dropout on.
TRAIN_SHARES = {"add_one": 1.0, "double": 0.25, "spell": 0.5}
TEST_SHARES = {"next_number": 1.0, "twice": 0.625}


def write_rows(path: Path, groups: dict, n: int | dict[str, int]) -> None:
    """A CSV of prompt/target rows with a `dataset` column naming each row's group (n rows per
    group, or n[group])."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "target", "dataset"])
        for name, make in groups.items():
            for i in range(n[name] if isinstance(n, dict) else n):
                writer.writerow([*make(i), name])


def group_sizes(shares: dict[str, float], n: int, equal: bool = False) -> dict[str, int]:
    """Rows per group: n times each group's share (at least 2), or n for all when equal."""
    return {g: n if equal else max(2, round(n * share)) for g, share in shares.items()}


def tiny_spec(tmp: Path, n_train_rows: int = 24, n_test_rows: int = 16,
              equal_sizes: bool = False) -> dict[str, Any]:
    """A small but complete job spec as a mapping (data files written under tmp): training
    sets of 24, 6 and 12 rows and test sets of 16 and 10 by default; a 1-layer GPT-2 with
    dropout 0.1."""
    write_rows(tmp / "train.csv", TRAIN_GROUPS, group_sizes(TRAIN_SHARES, n_train_rows,
                                                            equal_sizes))
    write_rows(tmp / "test.csv", TEST_GROUPS, group_sizes(TEST_SHARES, n_test_rows,
                                                          equal_sizes))
    return {
        "name": "tiny",
        "model": {"config": {
            "model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64,
            "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
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


def with_four_train_sets(spec: dict[str, Any]) -> dict[str, Any]:
    """tiny_spec with a fourth training set (the `twice` rows of test.csv, a teacher of that
    test set): LDS's subsets of two of four sets are 6, where three sets make only 3."""
    out = copy.deepcopy(spec)
    out["data"]["train"].append({"name": "teach_twice", "source": "test.csv",
                                 "subset": "twice"})
    return out


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


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[f"{name}_benchmark"] = module
    module_spec.loader.exec_module(module)
    return module


def run_through_cli(tmp: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Write a job, run it with `untrac-ray run` (a real local Ray, an MLflow SQLite store in
    tmp) and read everything back: job, uri, client, run, the CLI's output, the table."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from untrac_ray.cli import app
    from untrac_ray.results.runs import read_influence

    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["run", str(job), "--tracking-uri", uri, "--quiet"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(
        spec["tracking"]["experiment"]).experiment_id])
    return {"job": job, "uri": uri, "client": client, "run": run, "output": result.output,
            "table": read_influence(run.info.run_id, uri)}


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
def engine_inputs(make_job):
    """What an Engine is built from, for the tiny job: spec, tokenized data, a randomly
    initialised base model's weights, every row evaluated."""
    from untrac_ray.compute.evaluation import sample_indices
    from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.run.job_setup import prepare_data

    spec = load_spec(make_job())
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    weights = SharedWeights.from_model(build_model(config, seed=0))
    indices = {n: sample_indices(data.n_rows[n], None, 0) for n in data.sets}
    return spec, data, {"base": weights}, indices


@pytest.fixture
def bench_parts(make_job):
    """What a Workbench is built from, for the tiny job: a randomly initialised base model's
    shared weights, every tokenized set, and every row of each set as its evaluation rows."""
    from untrac_ray.compute.evaluation import sample_indices
    from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.run.job_setup import prepare_data

    spec = load_spec(make_job())
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    weights = SharedWeights.from_model(build_model(config, seed=0))
    sets = {name: data.tokenized(name) for name in data.sets}
    indices = {name: sample_indices(len(s), None, 0) for name, s in sets.items()}
    return weights, sets, indices


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
