"""`untrac-ray validate` fails, with one line and exit code 2, on what a cluster would fail on."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from untrac_ray.cli import app

runner = CliRunner()


def validate(job: Path):
    return runner.invoke(app, ["validate", str(job)])


def one_error_line(result) -> str:
    """The single `error:` line of a failed command (asserting exit 2 and no traceback)."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def model_folder_without_weights(tmp: Path) -> str:
    folder = tmp / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    return str(folder)


def a_file(tmp: Path) -> Path:
    path = tmp / "not_a_folder"
    path.write_text("a file where a folder should be\n")
    return path


def remote_parquet(tmp: Path) -> str:
    pq.write_table(pa.table({"question": ["q"], "target": ["a"]}), tmp / "remote.parquet")
    return f"file://{tmp / 'remote.parquet'}"


CASES = {
    "missing data file": (
        lambda tmp: {"data": {"test": [{"name": "t", "source": "nowhere.csv"}]}},
        ["data.test: dataset 't': file not found", "nowhere.csv"],
    ),
    "missing column": (
        lambda tmp: {"data": {"test": [{"name": "t", "source": "test.csv",
                                        "prompt_column": "question"}]}},
        ["data.test: dataset 't': column 'question' not found", "columns: prompt, target"],
    ),
    "empty set": (
        lambda tmp: (tmp / "empty.csv").write_text("prompt,target\n") and {
            "data": {"train": [{"name": "e", "source": "empty.csv"}]}},
        ["data.train: dataset 'e': no rows"],
    ),
    "subset that does not exist": (
        lambda tmp: {"data": {"test": [{"name": "toxic", "source": "test.csv",
                                        "subset": "toxicity"}]}},
        ["no rows with dataset == 'toxicity'", "available: next_number, twice"],
    ),
    "missing pretraining data": (
        lambda tmp: {"pretraining": {"data": [{"name": "wiki", "source": "wiki.parquet",
                                               "kind": "text"}]}},
        ["pretraining.data: dataset 'wiki': file not found"],
    ),
    "missing remote file": (
        lambda tmp: {"data": {"test": [{"name": "r", "source": f"file://{tmp}/gone.parquet"}]}},
        ["data.test: dataset 'r': file not found"],
    ),
    "remote file without a column": (
        lambda tmp: {"data": {"test": [{"name": "r", "source": remote_parquet(tmp)}]}},
        ["dataset 'r': column 'prompt' not found", "columns: question, target"],
    ),
    "model folder without weights": (
        lambda tmp: {"model": {"config": None, "path": model_folder_without_weights(tmp)}},
        ["model.path:", "has no weights"],
    ),
    "missing tokenizer folder": (
        lambda tmp: {"tokenizer": {"kind": "pretrained", "path": "no_tokenizer"}},
        ["tokenizer.path: tokenizer folder not found"],
    ),
    "cache_dir is a file": (
        lambda tmp: {"cache_dir": str(a_file(tmp))},
        ["cache_dir:", "is a file, not a folder"],
    ),
    "cache_dir under a file": (
        lambda tmp: {"cache_dir": str(a_file(tmp) / "cache")},
        ["cache_dir: cannot create", "not_a_folder is a file, not a folder"],
    ),
    "cache_dir that cannot be created": (
        lambda tmp: {"cache_dir": "/proc/untrac-ray-cache"},
        ["cache_dir: cannot create /proc/untrac-ray-cache"],
    ),
    "cache_dir not writable": (  # an existing folder that even root cannot write in
        lambda tmp: {"cache_dir": "/proc"},
        ["cache_dir: /proc is not writable"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_fails_with_one_line(case, make_job, tmp_path):
    make_override, expected = CASES[case]
    line = one_error_line(validate(make_job(make_override(tmp_path))))
    for text in expected:
        assert text in line


def test_a_good_job_validates_and_leaves_no_cache_behind(make_job, tmp_path):
    cache = tmp_path / "deep" / "cache"
    result = validate(make_job({"cache_dir": str(cache)}))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["cache_dir"] == str(cache)
    assert not (tmp_path / "deep").exists()


def test_job_file_not_utf8(make_job):
    job = make_job()
    text = job.read_bytes()
    job.write_bytes(b"# caf\xe9\n" + text)
    line = one_error_line(validate(job))
    assert f"{job}: not UTF-8 text (byte 0xe9 at position 5, line 1)" in line
    assert "save the file as UTF-8" in line


def test_job_file_that_is_a_directory(tmp_path):
    line = one_error_line(validate(tmp_path))
    assert f"job file {tmp_path} is a directory, not a YAML file" in line


def test_run_with_cache_dir_a_file_fails_before_any_work(make_job, tracking_uri, tmp_path):
    job = make_job({"cache_dir": str(a_file(tmp_path))})
    result = runner.invoke(app, ["run", str(job), "--tracking-uri", tracking_uri, "--quiet"])
    assert "is a file, not a folder" in one_error_line(result)
    assert not (tmp_path / "mlflow.db").exists()  # nothing logged, no Ray started
