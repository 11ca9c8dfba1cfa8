"""Job spec: validation on load, errors that name the key and the problem."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from conftest import merge
from untrac_ray.inputs import fingerprints
from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.fingerprints import (
    KEYED_UNLESS_DEFAULT,
    NOT_IN_RESULTS_KEY,
    results_key,
    results_key_material,
)
from untrac_ray.inputs.loading import inner_model, load_spec, parse_spec
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.inputs.spec_sections import TrackingSpec
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


# --- the results key ---------------------------------------------------------------------------

MISSING = object()


def _model_of(annotation):
    """The spec model inside an annotation (X, X | None, list[X]); a dict is a leaf here."""
    return None if typing.get_origin(annotation) is dict else inner_model(annotation)


def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf setting of a spec model, as a dotted path (lists of models: their fields)."""
    out = set()
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        out |= {f"{prefix}{name}"} if inner is None else _field_paths(inner, f"{prefix}{name}.")
    return out


def _get(tree, path: str):
    """The value at a dotted path of a dump (the first item of a list), or MISSING."""
    for part in path.split("."):
        if isinstance(tree, list):
            tree = tree[0] if tree else MISSING
        if not isinstance(tree, dict) or part not in tree:
            return MISSING
        tree = tree[part]
    return tree


def _excluded_paths(exclude: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in exclude.items():
        if value is True:
            out.add(prefix + key)
        elif isinstance(value, dict):
            out |= _excluded_paths(value, f"{prefix}{key}.")
        else:
            out |= {f"{prefix}{key}.{name}" for name in value}
    return out


def _full_specs() -> list[JobSpec]:
    """Two specs that set every section between them (ldo and ground_truth exclude each
    other)."""
    data = [{"name": "a", "source": "a.csv"}]
    unlearn = {"eval_points": 2}
    full = {
        "name": "full", "model": {"config": {"model_type": "gpt2", "n_layer": 1}},
        "tokenizer": {"kind": "byte"}, "cache_dir": "/tmp/cache",
        "pretraining": {"data": [{"name": "p", "source": "p.csv", "kind": "text"}],
                        "training": {"output_dir": "/tmp/pre"}},
        "training": {"checkpoints": [1], "output_dir": "/tmp/out"},
        "data": {"train": data, "test": [{"name": "b", "source": "b.csv", "group": "g"}]},
        # steps: same, as a setting hashed only when not its default (KEYED_UNLESS_DEFAULT)
        "methods": {"untrac": unlearn, "untrac_inv": unlearn,
                    "ldo": {"seeds": [0], "steps": "same"}, "lds": {"steps": "same"},
                    "graddot": {}, "gradcos": {}, "tracin": {}, "ekfac": {}},
        "evaluation": {}, "resources": {"address": "auto"}, "tracking": {"uri": "sqlite:///x"},
        "calibration": {"run_id": "c"},
        "search": {"space": {"untrac.learning_rate": [1e-5, 1e-4]},
                   "objective": {"methods": ["untrac"]}, "scheduler": {"kind": "asha"}},
    }
    # the second: a Hub model pinned to a commit (its revision is keyed as that commit)
    truth = merge(full, {"ground_truth": {"run_id": "r"}, "pretraining": None, "model": {
        "config": None, "path": "org/model", "revision": "0" * 40, "finetune": True}})
    truth["methods"] = {k: v for k, v in full["methods"].items() if k != "ldo"}
    return [parse_spec(full), parse_spec(truth)]


def test_every_setting_is_in_the_results_key_or_excluded_from_it():
    """One function says which settings decide a result, by what it leaves out: walking the
    spec's fields, each is either in what the key hashes or on NOT_IN_RESULTS_KEY, so a new
    setting is in the key unless someone decides otherwise."""
    paths = _field_paths(JobSpec)
    excluded = _excluded_paths(NOT_IN_RESULTS_KEY)
    assert all(any(p == e or p.startswith(e + ".") for p in paths) for e in excluded), (
        excluded - paths)
    reached = set()
    for spec in _full_specs():
        dump, material = spec.model_dump(mode="json"), results_key_material(spec)
        for path in paths:
            if _get(dump, path) is MISSING:
                continue
            if _get(dump, path) == KEYED_UNLESS_DEFAULT.get(tuple(path.split(".")), MISSING):
                continue  # hashed only when set otherwise (the other spec sets it)
            reached.add(path)
            out = any(path == e or path.startswith(e + ".") for e in excluded)
            assert (_get(material, path) is MISSING) == out, path
    assert reached == paths  # the two specs set every field
    assert "resources.weights_dtype" in paths - excluded and "resources.num_actors" in excluded


def test_the_results_key_follows_numerics_not_placement(monkeypatch):
    """What `run --resume` and `tune --resume` match on: changing the weights' dtype, the
    precision or the device changes it (the old keys kept only precision and tf32 for `run`,
    and no resources at all for `tune`); more actors, another cluster or store do not."""
    spec = _full_specs()[0]
    key = results_key(spec)
    for change in ({"weights_dtype": "bf16"}, {"precision": "bf16"}, {"gpus_per_actor": 1.0},
                   {"gradient_checkpointing": True}, {"tf32": True}):
        assert results_key(spec.model_copy(update={
            "resources": spec.resources.model_copy(update=change)})) != key, change
    for change in ({"num_actors": 8}, {"address": "ray://head:10001"}, {"max_retries": 0},
                   {"gpus_per_actor": 0.0}):
        assert results_key(spec.model_copy(update={
            "resources": spec.resources.model_copy(update=change)})) == key, change
    moved = spec.model_copy(update={"tracking": TrackingSpec(uri="http://mlflow:5000"),
                                    "cache_dir": "/elsewhere", "name": "renamed"})
    assert results_key(moved) == key
    monkeypatch.setattr(fingerprints, "RESULTS_VERSION", fingerprints.RESULTS_VERSION + 1)
    assert results_key(spec) != key  # results of another release are never restored


def test_lds_needs_a_model_this_job_trains(make_job, tmp_path):
    """lds retrains the model on subsets of the training sets, as ldo does without one: a
    model folder the job does not train is refused at load, in one line naming methods.lds."""
    msg = _error(make_job, {"model": {"config": None, "path": str(tmp_path)},
                            "methods": {"lds": {}}})
    assert ": methods.lds: needs a model that this job trains" in msg, msg
    assert "model.config" in msg and "finetune: true" in msg
    spec = load_spec(make_job({"model": {"config": None, "path": str(tmp_path),
                                         "finetune": True}, "methods": {"lds": {}}}))
    assert spec.methods.lds is not None
