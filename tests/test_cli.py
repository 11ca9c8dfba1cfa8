"""One CLI, one set of conventions, and the errors a new user meets: a YAML error at its
file:line:column, the nearest known key for an unknown one, an unreachable store said so with
what to start, `--set` overrides, `--version`, `schema`, the exit codes, the help's groups."""

from __future__ import annotations

import json
import socket

import yaml
from typer.testing import CliRunner

from conftest import merge, tiny_spec
from untrac_ray import __version__
from untrac_ray.cli import app

runner = CliRunner()


def _job(tmp_path, override: dict | None = None, text: str | None = None):
    job = tmp_path / "job.yaml"
    job.write_text(text if text is not None else yaml.safe_dump(
        merge(tiny_spec(tmp_path), override or {})))
    return job


def _error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_yaml_error_names_its_file_line_and_column(tmp_path):
    job = _job(tmp_path, text="name: x\nmodel:\n  path: m\n   config: 3\n")
    line = _error(runner.invoke(app, ["validate", str(job)]))
    assert f"{job}:4:10: not valid YAML: mapping values are not allowed here" in line
    job = _job(tmp_path, text="name: x\ndata:\n  train: [{name: a, source: ${DATA}}]\n")
    line = _error(runner.invoke(app, ["validate", str(job)]))
    assert f"{job}:3:30:" in line and 'a ${VAR} inside a {...} mapping needs quotes' in line


def test_an_unknown_key_suggests_the_nearest_known_one(tmp_path):
    job = _job(tmp_path, {"methods": {"untrac": {"learnin_rate": 1e-4}},
                          "tokeniser": {"kind": "byte"}})
    line = _error(runner.invoke(app, ["validate", str(job)]))
    assert "methods.untrac.learnin_rate: unknown key (did you mean 'learning_rate'?)" in line
    assert "tokeniser: unknown key (did you mean 'tokenizer'?)" in line
    job = _job(tmp_path, {"data": {"train": [{"name": "a", "source": "train.csv",
                                              "subset": "add_one", "colour": 1}]}})
    assert "data.train.0.colour: unknown key" in _error(runner.invoke(app, ["validate",
                                                                            str(job)]))


def test_an_unreachable_store_says_where_and_what_to_start():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free: nothing listens there once closed
    line = _error(runner.invoke(app, ["runs", "--tracking-uri", f"http://127.0.0.1:{port}"]))
    assert f"connection refused at 127.0.0.1:{port}" in line
    assert f"mlflow server --host 127.0.0.1 --port {port}" in line


def test_set_overrides_a_setting_of_the_job_file(tmp_path):
    job = _job(tmp_path)
    result = runner.invoke(app, ["validate", str(job), "--set", "methods.untrac.learning_rate=0.5",
                                 "--set", "data.train.0.max_rows=3", "--set", "methods.ldo={}"])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(result.stdout)
    assert spec["methods"]["untrac"]["learning_rate"] == 0.5
    assert spec["data"]["train"][0]["max_rows"] == 3 and spec["methods"]["ldo"] is not None
    line = _error(runner.invoke(app, ["validate", str(job), "--set", "methods.untrac"]))
    assert "--set 'methods.untrac': expected key.path=value" in line
    line = _error(runner.invoke(app, ["validate", str(job), "--set", "methods.untrac.lr=1"]))
    assert "did you mean 'learning_rate'" in line


def test_submit_checks_its_command_before_the_cluster(tmp_path):
    job = _job(tmp_path)
    line = _error(runner.invoke(app, ["submit", str(job), "--command", "train",
                                      "--address", "http://127.0.0.1:9"]))
    assert "--command: expected one of 'run'" in line and "cluster" not in line


def test_version_schema_and_the_help_s_groups():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"untrac-ray {__version__}"
    result = runner.invoke(app, ["schema"])
    schema = json.loads(result.stdout)
    assert {"name", "model", "data", "methods"} <= set(schema["properties"])
    assert "UnlearnSpec" in schema["$defs"]
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "160"}).output
    for group, commands in (("Run", ("validate", "run", "tune", "schema")),
                            ("Results", ("runs", "show", "compare", "report", "ui")),
                            ("Cluster", ("submit", "status", "logs", "stop", "jobs"))):
        panel = shown[shown.index(f"─ {group} "):]
        panel = panel[:panel.index("╰")]
        assert all(f" {c} " in panel for c in commands), (group, panel)
    # -f means --follow, -p --point, wherever they appear; a cluster job by its submission id
    for command, short, meaning in (("logs", "-f", "--follow"), ("submit", "-f", "--follow"),
                                    ("show", "-p", "--point")):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"}).output
        assert f"{meaning}" in text and f" {short} " in text.replace(",", " "), command
    for command in ("runs", "show", "compare", "ui", "report", "run"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"}).output
        assert " -f " not in text.replace(",", " ") and (
            command in ("show", "compare") or " -p " not in text.replace(",", " ")), command
    for command in ("status", "logs", "stop"):
        assert "SUBMISSION_ID" in runner.invoke(app, [command, "--help"]).output


def test_a_job_that_fails_while_it_runs_exits_1_and_bad_input_2(tmp_path, ray_cluster):
    bad = _job(tmp_path, {"methods": {"untrac": {"optimizer": "nesterov"}}})
    assert runner.invoke(app, ["run", str(bad)]).exit_code == 2
    job = _job(tmp_path, {"methods": {"untrac_inv": None, "untrac": {
        "optimizer": "sgd", "learning_rate": 1e30, "epochs": 1}}})
    result = runner.invoke(app, ["run", str(job), "--quiet", "--tracking-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}"])
    line = _error(result, code=1)
    assert "became non-finite while unlearning" in line
