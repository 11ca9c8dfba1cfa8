"""Bad input: one clear line, a non-zero exit, and never a half-written run marked FINISHED."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from untrac_ray.cli import app

runner = CliRunner()


def run_cli(job: Path, uri: str):
    return runner.invoke(app, ["run", str(job), "--tracking-uri", uri, "--quiet"])


def finished_runs(uri: str) -> list:
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids) if r.info.status == "FINISHED"]


def model_folder_without_weights(tmp: Path) -> str:
    folder = tmp / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    return str(folder)


CASES = {
    "missing file": (
        lambda tmp: {"data": {"test": [{"name": "t", "source": "nowhere.csv"}]}},
        "dataset 't': file not found",
    ),
    "missing column": (
        lambda tmp: {"data": {"test": [{"name": "t", "source": "test.csv",
                                        "prompt_column": "question"}]}},
        "column 'question' not found",
    ),
    "empty dataset": (
        lambda tmp: (tmp / "empty.csv").write_text("prompt,target\n") and {
            "data": {"test": [{"name": "t", "source": "empty.csv"}]}},
        "dataset 't': no rows",
    ),
    "test set name that does not exist": (
        lambda tmp: {"data": {"test": [{"name": "toxic", "source": "test.csv",
                                        "subset": "toxicity"}]}},
        "no rows with dataset == 'toxicity'",
    ),
    "model folder without weights": (
        lambda tmp: {"model": {"config": None, "path": model_folder_without_weights(tmp)}},
        "has no weights",
    ),
    "unknown optimizer": (
        lambda tmp: {"methods": {"untrac_inv": {"optimizer": "lion"}}},
        "methods.untrac_inv.optimizer",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_clear_line_and_no_run(case, make_job, tracking_uri, tmp_path):
    make_override, expected = CASES[case]
    job = make_job(make_override(tmp_path))
    result = run_cli(job, tracking_uri)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expected in lines[0]
    assert finished_runs(tracking_uri) == []


def test_dataset_name_used_twice_in_the_cli(make_job, tracking_uri):
    job = make_job({"data": {"test": [{"name": "t", "source": "test.csv"},
                                      {"name": "t", "source": "test.csv"}]}})
    result = run_cli(job, tracking_uri)
    assert result.exit_code != 0 and "'t' is used twice" in result.output


def test_nan_during_gradient_ascent_fails_the_run_naming_dataset_and_step(
    make_job, tracking_uri, ray_cluster
):
    job = make_job({"methods": {"untrac": {"optimizer": "sgd", "learning_rate": 1e30},
                                "untrac_inv": None}})
    result = run_cli(job, tracking_uri)
    assert result.exit_code != 0
    assert "while unlearning dataset '" in result.output and "at step" in result.output
    assert finished_runs(tracking_uri) == []
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert "at step" in run.data.tags["untrac_ray.error"]


def test_an_unreachable_tracking_store_fails_in_seconds_before_any_work(make_job, tmp_path):
    import time

    job = make_job()
    start = time.monotonic()
    result = run_cli(job, "http://127.0.0.1:9")  # nothing listens on the discard port
    assert result.exit_code == 2
    assert "tracking store http://127.0.0.1:9: connection refused at 127.0.0.1:9" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert time.monotonic() - start < 30
    assert not (tmp_path / "cache" / "tokenized").exists()  # no data work was done
    folder = tmp_path / "store"
    folder.mkdir()
    result = run_cli(job, f"sqlite:///{folder}")
    assert result.exit_code == 2 and "is a folder, not a database file" in result.output
