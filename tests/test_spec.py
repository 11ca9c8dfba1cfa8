"""Job spec: validation on load, errors that name the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.schedule import eval_schedules

ROOT = Path(__file__).resolve().parents[1]


def test_demo_job_validates_with_paths_resolved():
    spec = load_spec(ROOT / "jobs" / "synthetic_a.yaml")
    assert [d.name for d in spec.data.train] == ["SimSame", "SimDiff", "DisSame", "DisDiff"]
    assert Path(spec.data.train[0].source).is_file()
    assert list(spec.methods.enabled()) == ["untrac", "untrac_inv"]


def _error(make_job, override) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(make_job(override))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_optimizer_names_the_key(make_job):
    msg = _error(make_job, {"methods": {"untrac": {"optimizer": "rmsprop"}}})
    assert "methods.untrac.optimizer" in msg and "rmsprop" in msg and "adafactor" in msg


def test_dataset_name_used_twice(make_job, tmp_path):
    spec = yaml.safe_load(make_job().read_text())
    spec["data"]["train"][1]["name"] = spec["data"]["train"][0]["name"]
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="'add_one' is used twice"):
        load_spec(tmp_path / "dup.yaml")


def test_unknown_and_missing_keys(make_job):
    assert "unknown key" in _error(make_job, {"methods": {"untrac": {"lr": 0.1}}})
    assert "methods.untrac.lr" in _error(make_job, {"methods": {"untrac": {"lr": 0.1}}})
    assert "data: required key is missing" in _error(make_job, {"data": None})


def test_model_needs_exactly_one_source(make_job):
    msg = _error(make_job, {"model": {"path": "somewhere"}})
    assert "model" in msg and "exactly one" in msg


def test_negative_learning_rate_and_empty_eval_steps(make_job):
    assert "learning_rate" in _error(make_job, {"methods": {"untrac": {"learning_rate": -1}}})
    assert "eval_steps" in _error(make_job, {"methods": {"untrac": {"eval_steps": []}}})


def test_missing_job_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="job file not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_eval_steps_resolution():
    s = UnlearnSpec(batch_size=4, epochs=1, eval_every=3, eval_steps=[2, 99])
    assert s.total_steps(10) == 3
    assert eval_schedules(s, {"a": 10}) == {"a": (2, 3)}
    assert eval_schedules(UnlearnSpec(max_steps=7, eval_every=5), {"a": 1000}) == {"a": (5, 7)}


def test_eval_points_exclude_absolute_steps_and_bound_score_point(make_job):
    both = {"methods": {"untrac": {"eval_points": 4, "eval_every": 2}}}
    assert "give either eval_points" in _error(make_job, both)
    beyond = {"methods": {"untrac": {"eval_points": 4, "eval_every": None, "score_point": 5}}}
    assert "score_point: 5 is beyond the last of 4" in _error(make_job, beyond)


def test_a_spec_loads_without_torch_or_transformers():
    """Loading and validating a spec (a T5 config among them) imports neither: what a job is
    made of is checked in a second, and the model's kind by preflight, which runs first."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "from untrac_ray.inputs.loading import load_spec\n"
        f"for job in ('synthetic_a', 'synthetic_a_t5', 'text_corpora', 'search_demo'):\n"
        f"    load_spec({str(root / 'jobs')!r} + '/' + job + '.yaml')\n"
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'mlflow') if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
