"""cluster/ and jobs/pretraining/: every file parses, names only images, commands and files
that exist in the repository or are public, and the RayJob runs a valid `untrac-ray` command.
Nothing here downloads anything."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import typer
import yaml

import untrac_ray
from untrac_ray.cli import app
from untrac_ray.data import load_dataset_rows
from untrac_ray.spec import DatasetSpec, load_spec

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
IMAGE_HOME = "/home/ray/untrac-ray"  # where cluster/Dockerfile puts the repository
PUBLIC_RAY_IMAGE = re.compile(rf"^rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$")
BUILT_IMAGE = f"untrac-ray:{untrac_ray.__version__}"  # built from cluster/Dockerfile
PRETRAINING_JOBS = sorted((REPO / "jobs" / "pretraining").glob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def images(node) -> list[str]:
    """Every `image:` value in a manifest."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def repo_path_in_image(path: str) -> Path:
    """The repository file that a path inside the image comes from."""
    assert path.startswith(IMAGE_HOME + "/"), path
    return REPO / path.removeprefix(IMAGE_HOME + "/")


def test_every_file_in_cluster_is_known_and_parses():
    kinds = {".yaml": "yaml", ".md": "doc", ".py": "python", ".dockerignore": "ignore"}
    for path in sorted(CLUSTER.iterdir()):
        if path.name == "__pycache__":
            continue
        kind = "docker" if path.name == "Dockerfile" else kinds.get(path.suffix)
        assert kind, f"unexpected file in cluster/: {path.name}"
        if kind == "yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict), path.name
        elif kind == "python":
            compile(path.read_text(), str(path), "exec")


def test_the_dockerfile_builds_from_a_public_image_and_copies_only_repo_files():
    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert PUBLIC_RAY_IMAGE.match(base), base
    assert f"-t {BUILT_IMAGE} " in text  # the tag the manifests run
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        sources = [p for p in line.split()[:-1] if not p.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert f"!{source.rstrip('/')}" in ignore, f"{source} is not in the build context"
    assert "pip install --no-cache-dir -e ." in text


def test_the_cloud_launcher_config_is_valid_and_installs_this_repository():
    import jsonschema

    config = load("aws-gpu.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert PUBLIC_RAY_IMAGE.match(config["docker"]["image"])
    assert config["head_node_type"] in config["available_node_types"]
    ((remote, local),) = config["file_mounts"].items()
    assert (REPO / local).resolve() == REPO  # run `ray up` from the repository root
    assert f"pip install --quiet -e {remote}" in config["setup_commands"]
    assert any("dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_run_the_image_built_here_and_mount_the_data_where_jobs_expect(name):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    cluster = manifest["spec"] if manifest["kind"] == "RayCluster" else (
        manifest["spec"]["rayClusterSpec"])
    assert cluster["rayVersion"] == ray.__version__
    found = images(manifest)
    assert found and all(i == BUILT_IMAGE or PUBLIC_RAY_IMAGE.match(i) for i in found), found
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["mountPath"].startswith(IMAGE_HOME):
                    assert repo_path_in_image(mount["mountPath"]).is_dir(), mount
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert gpus and all(g == "1" for g in gpus)


def test_the_rayjob_entrypoint_is_a_valid_untrac_ray_command_line():
    job = load("kuberay-rayjob.yaml")
    assert job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "untrac-ray"
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="untrac-ray")
    assert argv[1] == "run"
    command = group.get_command(ctx, argv[1])
    params = command.make_context("run", argv[2:], parent=ctx).params  # parses, or raises
    assert params["address"] == "auto"  # join the cluster, not a new local Ray
    assert params["resume_if_any"] and job["spec"]["backoffLimit"] >= 1  # a retry resumes
    assert params["tracking_uri"].startswith("http")
    spec_file = repo_path_in_image(str(params["job"]))
    assert spec_file.is_file()
    load_spec(spec_file)


def test_files_named_in_the_cluster_readme_exist():
    text = (CLUSTER / "README.md").read_text()
    named = set(re.findall(r"`((?:cluster|jobs)/[\w./-]+)`", text))
    named |= {f"cluster/{n}" for n in re.findall(r"`([\w.-]+\.(?:yaml|py))`", text)}
    named |= set(re.findall(r"\b((?:cluster|jobs)/[\w/-]+\.(?:yaml|py))", text))
    assert named
    for path in named:
        assert (REPO / path).exists(), path


# ---------------------------------------------------------------- jobs/pretraining


def test_pretraining_jobs_validate_at_gpu_scale():
    assert len(PRETRAINING_JOBS) >= 2
    for path in PRETRAINING_JOBS:
        spec = load_spec(path)
        assert len(spec.data.train) == 8 and len(spec.data.test) == 3
        assert [d.name for d in spec.data.test] == ["ToxiGen", "WinoBias", "TruthfulQA"]
        assert spec.resources.gpus_per_actor == 1 and spec.resources.precision == "bf16"
        assert {"untrac", "untrac_inv"} <= set(spec.methods.enabled())
        data = REPO / "data" / "pretraining"
        assert all(Path(d.source).parent == data for d in [*spec.data.train, *spec.data.test])
    scratch = load_spec(REPO / "jobs" / "pretraining" / "opt125m.yaml")
    assert scratch.model.config["model_type"] == "opt"
    assert scratch.model.config["hidden_size"] == 768
    assert scratch.model.config["num_hidden_layers"] == 12


def prepare_module():
    path = REPO / "jobs" / "pretraining" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_prepare_data_builds_rows_the_jobs_read(tmp_path):
    prep = prepare_module()
    assert set(prep.SOURCES) == {Path(d.source).stem for d in load_spec(
        PRETRAINING_JOBS[0]).data.train}
    rows = list(prep.pack(["a" * 50] * 10 + ["word " * 500], max_chars=300, min_chars=100))
    assert rows and all(100 <= len(r) <= 300 for r in rows)
    toxic = list(prep.toxigen_rows([{"text": "x is bad", "toxicity_human": 4.3},
                                    {"text": "x is fine", "toxicity_human": 1.0},
                                    {"text": "x is bad", "toxicity_human": 5.0}]))
    assert toxic == [{"text": "x is bad"}]
    assert list(prep.winobias_rows([{"tokens": ["The", "nurse", "said", "she", "was",
                                                 "tired", "."]}])) == [
        {"text": "The nurse said she was tired."}]
    qa = list(prep.truthfulqa_rows([{"question": "Q?", "incorrect_answers": ["", "No."]},
                                    {"question": "R?", "incorrect_answers": []}]))
    assert qa == [{"prompt": "Q?", "target": "No."}]
    assert prep.parse_override("Wikipedia=wiki/en:cfg::body")[1] == prep.Source(
        "wiki/en", "cfg", "train", "body")
    prep.write_parquet(iter(qa), tmp_path / "truthfulqa.parquet")
    prep.write_parquet(({"text": r} for r in rows), tmp_path / "Wikipedia.parquet", limit=2)
    assert pq.read_table(tmp_path / "Wikipedia.parquet").num_rows == 2
    table = load_dataset_rows(DatasetSpec(name="TruthfulQA",
                                          source=str(tmp_path / "truthfulqa.parquet")))
    assert table.to_pylist() == [{"prompt": "Q?", "target": "No."}]
    text = load_dataset_rows(DatasetSpec(name="W", source=str(tmp_path / "Wikipedia.parquet"),
                                         kind="text"))
    assert text.num_rows == 2
