"""Files the CLI writes are UTF-8 whatever the locale (issue 31): a run whose names hold
non-ASCII characters is written by `report`, `show --output` and `compare --output` under a
C/ASCII locale (LC_ALL=C, UTF-8 mode off, no PYTHONIOENCODING), and reads back as UTF-8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import merge, tiny_spec
from untrac_ray.inputs.loading import load_spec
from untrac_ray.run.runner import run_job

NAME = "Café—π"  # a test set's name: Latin-1, a dash beyond Latin-1, Greek


@pytest.fixture(scope="module")
def accented_run(tmp_path_factory, ray_cluster):
    """One real tiny run (UnTrac-Inv only) whose first test set is named NAME."""
    tmp = tmp_path_factory.mktemp("encoding")
    spec = merge(tiny_spec(tmp), {"name": "tiny_ça", "methods": {"untrac": None}})
    spec["data"]["test"][0]["name"] = NAME
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return SimpleNamespace(tmp=tmp, uri=uri, run_id=run_job(load_spec(path), uri).run_id)


def _ascii_cli(run, *args: str) -> subprocess.CompletedProcess:
    """`untrac-ray ARGS --tracking-uri URI` in a subprocess under the C locale."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONIOENCODING", "LANGUAGE") and not k.startswith("LC_")}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", COLUMNS="200")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "untrac_ray", *args, "--tracking-uri", run.uri],
        env=env, cwd=run.tmp, capture_output=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> None:
    out = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, out
    assert "Traceback" not in out and "UnicodeEncodeError" not in out, out


def test_the_locale_of_the_subprocess_is_ascii(accented_run):
    """The environment _ascii_cli runs in really is ASCII (else the tests prove nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0")
    code = "import locale,sys;print(locale.getpreferredencoding(False), sys.flags.utf8_mode)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0].lower() in ("ansi_x3.4-1968", "ascii", "us-ascii") and out[1] == "0", out


def test_report_writes_a_utf8_page_under_an_ascii_locale(accented_run):
    page = accented_run.tmp / "page.html"
    _ok(_ascii_cli(accented_run, "report", accented_run.run_id, "--output", str(page)))
    text = page.read_bytes().decode("utf-8")
    assert NAME in text and '<meta charset="utf-8">' in text


@pytest.mark.parametrize("fmt", ["text", "csv", "json"])
def test_show_and_compare_write_utf8_files_under_an_ascii_locale(accented_run, fmt):
    run = accented_run
    for command, args in (("show", [run.run_id]),
                          ("compare", [run.run_id, run.run_id, "--method", "untrac_inv",
                                       "--point-a", "1", "--point-b", "2"])):
        out = run.tmp / f"{command}.{fmt}"
        _ok(_ascii_cli(run, command, *args, "--format", fmt, "--output", str(out)))
        text = out.read_bytes().decode("utf-8")
        if fmt == "json":  # JSON escapes what is not ASCII; the name is in what it holds
            text = json.dumps(json.loads(text), ensure_ascii=False)
        assert NAME in text, (command, fmt, text[:500])


def test_show_to_an_ascii_terminal_escapes_what_it_cannot_print(accented_run):
    """Printed to a stdout that holds ASCII only, the names come out escaped, not a crash."""
    result = _ascii_cli(accented_run, "show", accented_run.run_id)
    _ok(result)
    assert "Caf\\xe9\\u2014\\u03c0" in result.stdout.decode("ascii")
