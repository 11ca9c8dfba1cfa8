"""The public entry points survive the package's layout: the console script's `app`,
`python -m untrac_ray` and `python -m untrac_ray.cli` (what a cluster job runs), and the
reader the README documents, also under its name from before the layers."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest


@pytest.mark.parametrize("module", ["untrac_ray", "untrac_ray.cli"])
def test_python_dash_m_runs_the_cli(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("run", "validate", "tune", "submit", "show"):
        assert command in done.stdout


def test_the_documented_reader_and_its_old_name():
    from untrac_ray.results import read_influence
    from untrac_ray.results.runs import read_influence as defined

    assert read_influence is defined
    sys.modules.pop("untrac_ray.tracking", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from untrac_ray.tracking import read_influence as old
    assert old is defined
    assert any("untrac_ray.results.runs" in str(w.message) for w in caught)
    with pytest.raises(AttributeError):
        _ = __import__("untrac_ray.results", fromlist=["nothing"]).no_such_name
