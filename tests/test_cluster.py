"""Clusters: `submit` / `status` / `logs` / `stop` / `jobs` against a real Ray head started with
`ray start --head` (token authentication on, job server included), staging of a job's files,
GPU placement with fake resource counts, and bf16 / TF32 options on CPU.

The head uses its own free ports and a temp dir under /tmp (short: Unix socket paths are
limited), and is stopped by killing its process group, so it never touches another cluster on
this machine. Run only these with `pytest -m ray_head`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec
from untrac_ray.cli import app
from untrac_ray.compute.precision import configure_tf32, precision_context
from untrac_ray.engine.placement import actor_slots
from untrac_ray.engine.pool import plan_pool_size
from untrac_ray.inputs.errors import SpecError, UntracError
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_sections import ResourcesSpec
from untrac_ray.results.runs import read_influence
from untrac_ray.submit import client as jobs_api
from untrac_ray.submit import staging

runner = CliRunner()
HEAD_READY_S = 180  # deadline for the job server of a fresh head to answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- a real Ray head


REPO = Path(__file__).resolve().parent.parent
LOCAL_HEAD = REPO / "cluster" / "local_head.py"


@dataclass
class RayHead:
    """A head started by the repo's local recipe, cluster/local_head.py."""

    url: str
    root: Path
    token: str
    token_file: Path
    ready_s: float

    def client_env(self, **extra: str | None) -> dict[str, str | None]:
        """Environment for the CLI: the token by file, nothing pointing elsewhere."""
        env: dict[str, str | None] = {"RAY_AUTH_TOKEN_PATH": str(self.token_file),
                                      "RAY_AUTH_TOKEN": None, "RAY_ADDRESS": None,
                                      "MLFLOW_TRACKING_URI": None}
        env.update(extra)
        return env

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _sigint_ignored() -> None:
    """As `ray start --head &` in a script leaves it: SIGINT ignored, in the head and in every
    job driver it starts (the disposition is inherited through fork and exec)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def local_head(command: str, root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LOCAL_HEAD), command, "--state", str(root), *args],
        capture_output=True, text=True, timeout=HEAD_READY_S + 60,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        preexec_fn=_sigint_ignored if command == "start" else None,
    )


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on loopback with its own free ports and a short temp dir (Unix
    socket paths are limited), 2 CPUs and 2 logical GPUs, token authentication on; started
    with SIGINT ignored, as a script's `ray start --head &` is."""
    root = Path(tempfile.mkdtemp(prefix="ur-", dir="/tmp"))
    started = local_head("start", root, "--free-ports", "--num-cpus", "2", "--num-gpus", "2",
                         "--object-store-mb", "200", "--timeout", str(HEAD_READY_S))
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        info = json.loads((root / "head.json").read_text())
        token_file = Path(info["token_file"])
        head = RayHead(info["url"], root, token_file.read_text().strip(), token_file,
                       info["ready_seconds"])
        assert head.token not in started.stdout + started.stderr
        assert started.stdout.startswith(f"export RAY_ADDRESS={head.url}\n")
        print(f"\nray head: job server answered {head.ready_s:.1f} s after ray start")
        yield head
    finally:
        stopped = local_head("stop", root)
        assert stopped.returncode == 0 and "stopped" in stopped.stderr
        assert not processes_under(root), "the head left processes behind"
        shutil.rmtree(root, ignore_errors=True)


def processes_under(root: Path) -> list[int]:
    """Processes whose command line or working folder lies under `root`."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (p.info["cwd"] or "").startswith(str(root)) or any(
                    str(root) in part for part in p.info["cmdline"] or []):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def cli(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env)


def write_job(folder: Path, override: dict | None = None, name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = merge(tiny_spec(folder), override or {})
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def local_and_cluster(head, tmp_path_factory, ray_cluster):
    """The tiny job on the head (`untrac-ray submit --follow`, a real CLI process) and, at the
    same time, locally (`untrac-ray run`)."""
    tmp = tmp_path_factory.mktemp("cluster-job")
    job = write_job(tmp / "job")
    local_uri = f"sqlite:///{tmp / 'local.db'}"
    cluster_uri = f"sqlite:///{tmp / 'cluster.db'}"
    env = {k: v for k, v in os.environ.items() if k not in head.client_env()}
    env.update({k: v for k, v in head.client_env().items() if v is not None})
    start = time.monotonic()
    follow = subprocess.Popen(
        [sys.executable, "-m", "untrac_ray.cli", "submit", str(job), "--address", head.url,
         "--follow", "--tracking-uri", cluster_uri],
        cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        local = cli("run", str(job), "--tracking-uri", local_uri, "--quiet")
        stdout, stderr = follow.communicate(timeout=600)
    finally:
        follow.kill()
    print(f"\nsubmit --follow of the tiny job took {time.monotonic() - start:.1f} s")
    assert local.exit_code == 0, local.output
    submitted = SimpleNamespace(exit_code=follow.returncode, stdout=stdout,
                                output=stdout + stderr)
    return {"job": job, "local_uri": local_uri, "cluster_uri": cluster_uri, "local": local,
            "submitted": submitted, "sid": stdout.splitlines()[0].strip() if stdout else ""}


def read_tag(db: Path, key: str) -> str | None:
    """A run tag read straight from an MLflow SQLite file, read-only: an MLflow client here
    would race the job's driver creating the store."""
    import sqlite3

    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT value FROM tags WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def only_run(uri: str, experiment: str = "tests"):
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.mark.ray_head
def test_submit_follow_runs_the_job_on_the_cluster_with_the_same_matrix(head, local_and_cluster):
    result = local_and_cluster["submitted"]
    assert result.exit_code == 0, result.output
    sid = local_and_cluster["sid"]
    assert sid.startswith("untrac-tiny-")
    assert "SUCCEEDED" in result.output and "MLflow run" in result.output
    cluster_run = only_run(local_and_cluster["cluster_uri"])
    assert cluster_run.info.status == "FINISHED"
    assert cluster_run.data.tags[staging.SUBMISSION_TAG] == sid
    local_run = only_run(local_and_cluster["local_uri"])
    assert staging.SUBMISSION_TAG not in local_run.data.tags
    on_cluster = read_influence(cluster_run.info.run_id, local_and_cluster["cluster_uri"])
    here = read_influence(local_run.info.run_id, local_and_cluster["local_uri"])
    key = ["method", "point", "step", "train_set", "test_set"]
    on_cluster, here = on_cluster.sort_values(key), here.sort_values(key)
    assert on_cluster[key].to_numpy().tolist() == here[key].to_numpy().tolist()
    np.testing.assert_allclose(on_cluster.influence, here.influence, rtol=1e-5, atol=1e-7)
    assert head.token not in result.output


@pytest.mark.ray_head
def test_status_logs_and_jobs_describe_the_finished_job(head, local_and_cluster):
    sid = local_and_cluster["sid"]
    run_id = only_run(local_and_cluster["cluster_uri"]).info.run_id
    env = head.client_env()
    status = cli("status", sid, "--address", head.url, env=env)
    assert status.exit_code == 0, status.output
    assert "SUCCEEDED" in status.output and run_id in status.output
    logs = cli("logs", sid, "--address", head.url, env=env)
    assert logs.exit_code == 0 and f"MLflow run {run_id}" in logs.output
    followed = cli("logs", sid, "--address", head.url, "--follow", env=env)
    assert followed.exit_code == 0 and run_id in followed.output
    # RAY_ADDRESS is the address when --address is not given
    listed = cli("jobs", env=head.client_env(RAY_ADDRESS=head.url))
    assert listed.exit_code == 0, listed.output
    (line,) = [ln for ln in listed.output.splitlines() if sid in ln]
    assert "tiny" in line and "SUCCEEDED" in line and run_id in line
    for out in (status.output, logs.output, listed.output):
        assert head.token not in out


@pytest.mark.ray_head
def test_one_actor_per_gpu_and_stop_ends_a_long_running_job(head, tmp_path, monkeypatch):
    """On the head's 2 logical GPUs, 3 unlearning tasks get 2 actors (the third queues);
    `stop` ends the job and its MLflow run is marked KILLED."""
    job = write_job(tmp_path / "long", {"name": "long", "resources": {
        "gpus_per_actor": 1, "cpus_per_actor": 0.5}, "methods": {
        "untrac": {"max_steps": 100000, "eval_every": 100000}, "untrac_inv": None}})
    env = head.client_env()
    uri = f"sqlite:///{tmp_path / 'long.db'}"
    submitted = cli("submit", str(job), "--address", head.url, "--tracking-uri", uri, env=env)
    assert submitted.exit_code == 0, submitted.output
    sid = submitted.stdout.splitlines()[0].strip()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    cluster = jobs_api.Cluster(head.url)
    deadline = time.monotonic() + 120
    actors = None
    while actors is None and time.monotonic() < deadline:  # until the pool is up
        assert cluster.status(sid) in ("PENDING", "RUNNING"), cluster.logs(sid)[-2000:]
        actors = read_tag(tmp_path / "long.db", "untrac_ray.actors")
        time.sleep(0.5)
    assert actors == "2"
    run = only_run(uri)
    assert run.data.tags[staging.SUBMISSION_TAG] == sid
    stopped = cli("stop", sid, "--address", head.url, env=env)
    assert stopped.exit_code == 0, stopped.output
    assert f"{sid}: STOPPED" in stopped.output
    again = cli("stop", sid, "--address", head.url, env=env)
    assert again.exit_code == 0 and "already STOPPED" in again.output
    followed = cli("logs", sid, "--address", head.url, "--follow", env=env)
    assert followed.exit_code == 3  # a stopped job
    listed = cli("jobs", "--address", head.url, env=env)
    (line,) = [ln for ln in listed.output.splitlines() if sid in ln]
    assert "long" in line and "STOPPED" in line
    # the driver closes its run within the stop's grace period (submission.STOP_GRACE_S),
    # although it inherited SIGINT (the stop signal) ignored from the head (signals.py)
    deadline = time.monotonic() + staging.STOP_GRACE_S
    while only_run(uri).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
    assert only_run(uri).info.status == "KILLED", cluster.logs(sid)[-3000:]


@pytest.mark.ray_head
@pytest.mark.slow  # 55 s: resume itself is test_resume.py's; submit --resume's command line is
# checked in test_cluster_tracking_uri_and_entrypoint
def test_a_stopped_job_resubmitted_with_resume_finishes_its_own_run(head, tmp_path):
    """`stop` ends a job KILLED after some tasks finished; `submit --resume` continues the same
    MLflow run on the cluster: the finished tasks are restored, the run ends FINISHED."""
    job = write_job(tmp_path / "again", {"name": "again", "methods": {
        "untrac": {"epochs": 40, "eval_every": None, "eval_points": 2}, "untrac_inv": None},
        "resources": {"num_actors": 1}})
    env = head.client_env()
    db = tmp_path / "again.db"
    uri = f"sqlite:///{db}"
    submitted = cli("submit", str(job), "--address", head.url, "--tracking-uri", uri, env=env)
    assert submitted.exit_code == 0, submitted.output
    sid = submitted.stdout.splitlines()[0].strip()
    deadline = time.monotonic() + 180
    stored: list[Path] = []
    while len(stored) < 3 and time.monotonic() < deadline:  # base losses, one trajectory
        stored = list(tmp_path.glob("mlartifacts/**/tasks/*.npz"))
        time.sleep(0.3)
    assert len(stored) >= 3, cli("logs", sid, "--address", head.url, env=env).output[-3000:]
    assert cli("stop", sid, "--address", head.url, env=env).exit_code == 0
    killed = only_run(uri)
    assert killed.info.status == "KILLED"
    again = cli("submit", str(job), "--address", head.url, "--tracking-uri", uri, "--resume",
                "--follow", env=env)
    assert again.exit_code == 0, again.output
    assert "resumed: restored" in again.output, again.output
    run = only_run(uri)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["untrac_ray.restored_tasks"]) >= 3
    table = read_influence(run.info.run_id, uri)
    assert len(table) == 3 * 2 * 2 and table["influence"].notna().all()


@pytest.mark.ray_head
def test_invalid_spec_is_refused_before_it_reaches_the_cluster(head, tmp_path):
    before = len(requests.get(f"{head.url}/api/jobs/", headers=head.headers(), timeout=10)
                 .json())
    bad = write_job(tmp_path, {"methods": {"untrac": {"learning_rate": -1}}})
    result = cli("submit", str(bad), "--address", head.url, "--tracking-uri", "sqlite:///x.db",
                 env=head.client_env())
    assert result.exit_code == 2
    assert "methods.untrac.learning_rate" in result.output and "Traceback" not in result.output
    missing = write_job(tmp_path / "m", {"data": {"test": [
        {"name": "gone", "source": "nowhere.csv"}]}})
    result = cli("submit", str(missing), "--address", head.url, "--tracking-uri",
                 "sqlite:///x.db", env=head.client_env())
    assert result.exit_code == 2 and "nowhere.csv does not exist here" in result.output
    after = len(requests.get(f"{head.url}/api/jobs/", headers=head.headers(), timeout=10)
                .json())
    assert after == before


@pytest.mark.ray_head
def test_a_missing_or_wrong_token_is_named_plainly_and_never_printed(head, tmp_path):
    nowhere = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": None, "RAY_AUTH_TOKEN": None}
    result = cli("jobs", "--address", head.url, env=head.client_env(**nowhere))
    assert result.exit_code == 2
    assert "requires a token and none was found" in result.output
    assert "RAY_AUTH_TOKEN" in result.output and "Traceback" not in result.output
    wrong = "not-the-token-" + secrets.token_hex(8)
    result = cli("status", "x", "--address", head.url,
                 env=head.client_env(RAY_AUTH_TOKEN=wrong, RAY_AUTH_TOKEN_PATH=None))
    assert result.exit_code == 2
    assert "refused the token from RAY_AUTH_TOKEN" in result.output
    assert wrong not in result.output and head.token not in result.output
    unknown = cli("status", "no-such-job", "--address", head.url, env=head.client_env())
    assert unknown.exit_code == 2 and "no job 'no-such-job'" in unknown.output


# ---------------------------------------------------------------- without a head


def test_an_unreachable_address_gives_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    job = write_job(tmp_path)
    for args in (["jobs"], ["status", "x"], ["logs", "x"], ["stop", "x"],
                 ["submit", str(job), "--tracking-uri", "sqlite:///x.db"]):
        result = cli(*args, "--address", url)
        assert result.exit_code == 2, result.output
        assert f"no Ray cluster answers at {url}" in result.output
        assert "Traceback" not in result.output
    result = cli("jobs", env={"RAY_ADDRESS": None})
    assert result.exit_code == 2 and "no Ray cluster address" in result.output


def test_addresses_come_from_the_option_then_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://env-head:8265")
    assert jobs_api.resolve_address("head:8265") == "http://head:8265"
    assert jobs_api.resolve_address(None) == "http://env-head:8265"
    for bad in ("auto", "ray://head:10001"):
        with pytest.raises(jobs_api.ClusterError, match="dashboard URL"):
            jobs_api.resolve_address(bad)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(jobs_api.ClusterError, match="--address"):
        jobs_api.resolve_address(None)


def test_the_token_is_found_the_way_ray_finds_it(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    (tmp_path / "file").write_text("file-token")
    assert jobs_api.find_token({"RAY_AUTH_TOKEN": "env-token"}, tmp_path).value == "env-token"
    found = jobs_api.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}, tmp_path)
    assert found.value == "file-token" and "file-token" not in repr(found)
    assert jobs_api.find_token({}, tmp_path).value == "home-token"
    assert jobs_api.find_token({}, tmp_path / "elsewhere") is None
    with pytest.raises(jobs_api.ClusterAuthError, match="does not exist"):
        jobs_api.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")}, tmp_path)
    assert jobs_api.auth_headers(found) == {"Authorization": "Bearer file-token"}


def test_staging_uploads_local_files_and_keeps_shared_paths_and_uris(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    job = write_job(tmp_path / "job", {"data": {"test": [
        {"name": "next_number", "source": str(shared / "test.csv"), "subset": "next_number"},
        {"name": "twice", "source": "s3://bucket/test.parquet", "subset": "twice"}]}})
    shutil.copy(tmp_path / "job" / "test.csv", shared / "test.csv")
    staged = staging.stage_job(job, shared=[str(shared)])
    try:
        assert list(staged.uploaded.values()) == ["files/0/train.csv"]
        assert sorted(staged.passed) == sorted([str(shared / "test.csv"),
                                                "s3://bucket/test.parquet"])
        moved = load_spec(staged.folder / staging.STAGED_SPEC)
        assert moved.data.train[0].source == str(staged.folder / "files/0/train.csv")
        assert moved.data.test[0].source == str(shared / "test.csv")
        assert moved.data.test[1].source == "s3://bucket/test.parquet"
        # the cache stays with the job on the cluster, not at this machine's path
        assert moved.cache_dir == str(Path.cwd() / ".untrac-ray")
        assert (staged.folder / "files/0/train.csv").read_bytes() == (
            tmp_path / "job" / "train.csv").read_bytes()
    finally:
        staged.cleanup()
    assert not staged.folder.exists()


def test_shared_folders_can_sit_elsewhere_on_the_cluster(tmp_path):
    """--shared LOCAL=CLUSTER: files under LOCAL are where the nodes see CLUSTER, unread here."""
    job = write_job(tmp_path / "job", {
        "data": {"test": [{"name": "far", "source": "../data/far.csv"}]},
        "cache_dir": "../data/cache"})
    staged = staging.stage_job(job, shared=[f"{tmp_path / 'data'}=/mnt/nfs/data"])
    try:
        moved = yaml.safe_load((staged.folder / staging.STAGED_SPEC).read_text())
        assert moved["data"]["test"][0]["source"] == "/mnt/nfs/data/far.csv"
        assert moved["cache_dir"] == "/mnt/nfs/data/cache"
        assert staged.passed == ["/mnt/nfs/data/far.csv"]
    finally:
        staged.cleanup()
    assert staging.on_cluster("/a/b/c", staging.shared_prefixes(["/a=/x/"])) == "/x/b/c"
    assert staging.on_cluster("/a", staging.shared_prefixes(["/a=/x"])) == "/x"
    assert staging.on_cluster("/ab/c", staging.shared_prefixes(["/a"])) is None


def test_staging_refuses_files_above_the_upload_limit(tmp_path):
    job = write_job(tmp_path)
    with pytest.raises(staging.UploadError, match="--shared PREFIX .*, or on remote storage"):
        staging.stage_job(job, limit=1000)
    with pytest.raises(SpecError):
        staging.stage_job(tmp_path / "no-such-job.yaml")


def test_cluster_tracking_uri_and_entrypoint(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_job(tmp_path))
    with pytest.raises(UntracError, match="--tracking-uri"):
        staging.cluster_tracking_uri(None, spec)
    assert staging.cluster_tracking_uri("sqlite:///m.db", spec) == f"sqlite:///{tmp_path}/m.db"
    assert staging.cluster_tracking_uri("http://mlflow:5000", spec) == "http://mlflow:5000"
    command = staging.entrypoint("/opt/py env/bin/python", "http://mlflow:5000")
    assert command == ("'/opt/py env/bin/python' -m untrac_ray.cli run job.yaml "
                       "--address auto --tracking-uri http://mlflow:5000")
    assert " run --resume job.yaml " in staging.entrypoint("python", "x", command="run --resume")
    with pytest.raises(UntracError, match="--command: expected one of"):
        staging.entrypoint("python", "x", command="run; rm -rf /")


def test_the_submission_id_reaches_the_mlflow_tags():
    assert staging.submission_tags({}) == {}
    assert staging.submission_tags({staging.SUBMISSION_ENV: "untrac-a-1"}) == {
        staging.SUBMISSION_TAG: "untrac-a-1"}
    ray_json = '{"metadata": {"job_submission_id": "raysubmit_X"}}'
    assert staging.submission_tags({"RAY_JOB_CONFIG_JSON_ENV_VAR": ray_json}) == {
        staging.SUBMISSION_TAG: "raysubmit_X"}


# ---------------------------------------------------------------- GPU placement, fake counts

NODES = [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}, {"CPU": 32.0}]


def totals(nodes):
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


def test_one_actor_per_gpu_across_all_nodes():
    gpu = ResourcesSpec(gpus_per_actor=1)
    assert plan_pool_size(gpu, totals(NODES), max_useful=100, nodes=NODES) == 8
    assert plan_pool_size(gpu, totals(NODES), max_useful=3, nodes=NODES) == 3  # fewer tasks
    half = ResourcesSpec(gpus_per_actor=0.5, cpus_per_actor=1)
    assert plan_pool_size(half, totals(NODES), 100, nodes=NODES) == 16


def test_actors_are_counted_node_by_node():
    nodes = [{"CPU": 8.0, "GPU": 3.0}, {"CPU": 8.0, "GPU": 3.0}]
    two = ResourcesSpec(gpus_per_actor=2)
    assert plan_pool_size(two, totals(nodes), 100) == 3  # by totals: one would never start
    assert plan_pool_size(two, totals(nodes), 100, nodes=nodes) == 2
    assert actor_slots([{"CPU": 2.0, "GPU": 4.0}], cpus_per_actor=1, gpus_per_actor=1) == 2
    assert actor_slots([{"CPU": 6.0}, {"CPU": 6.0}], cpus_per_actor=4, gpus_per_actor=0) == 2
    with pytest.raises(UntracError, match="has no GPU"):
        plan_pool_size(ResourcesSpec(gpus_per_actor=1), {"CPU": 8.0}, 4, nodes=[{"CPU": 8.0}])
    one_each = [{"CPU": 8.0, "GPU": 1.0}] * 2
    with pytest.raises(UntracError, match="no node with that many GPUs"):
        plan_pool_size(two, totals(one_each), 4, nodes=one_each)


# ---------------------------------------------------------------- precision options on CPU


def tiny_model():
    from untrac_ray.compute.modeling import build_model, config_from_dict

    config = config_from_dict({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32,
                               "n_positions": 32}, vocab_size=64)
    return build_model(config, seed=0).eval()  # no dropout


def test_bf16_precision_context_runs_forward_passes_in_bf16_and_keeps_fp32_weights():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with precision_context("cpu", "fp32"):
        fp32 = model(input_ids=ids).logits
    with precision_context("cpu", "bf16"):
        bf16 = model(input_ids=ids).logits
    assert model(input_ids=ids).logits.dtype == torch.float32  # the model itself is untouched
    assert "forward" not in vars(model)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(fp32, bf16.float())
    assert torch.allclose(fp32, bf16.float(), atol=0.1)
    bf16.float().sum().backward()  # gradients reach the fp32 weights
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="precision"):
        precision_context("cpu", "fp16")


def test_tf32_is_set_for_cuda_only():
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        configure_tf32(True, "cpu")
        assert torch.backends.cuda.matmul.fp32_precision == before
        configure_tf32(True, "cuda")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        configure_tf32(False, "cuda")
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
        torch.backends.cudnn.conv.fp32_precision = before


def test_tf32_uses_the_older_switches_before_torch_2_9(monkeypatch):
    """torch < 2.9 has no fp32_precision attributes: allow_tf32 is set instead."""
    from types import SimpleNamespace

    old_matmul, old_cudnn = SimpleNamespace(allow_tf32=False), SimpleNamespace(allow_tf32=False)
    monkeypatch.setattr(torch.backends.cuda, "matmul", old_matmul)
    monkeypatch.setattr(torch.backends, "cudnn", old_cudnn)
    configure_tf32(True, "cuda")
    assert old_matmul.allow_tf32 is True and old_cudnn.allow_tf32 is True
    configure_tf32(False, "cuda")
    assert old_matmul.allow_tf32 is False and old_cudnn.allow_tf32 is False


def test_precision_options_in_the_spec():
    assert ResourcesSpec().precision == "fp32" and ResourcesSpec().tf32 is False
    assert ResourcesSpec(precision="bf16", tf32=True).precision == "bf16"
    from untrac_ray.inputs.loading import parse_spec

    with pytest.raises(SpecError, match="resources.precision"):
        parse_spec(merge(tiny_spec_mapping(), {"resources": {"precision": "fp16"}}))


def tiny_spec_mapping() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return tiny_spec(Path(tmp))


def test_a_bf16_job_runs_its_actors_under_autocast(tmp_path, ray_cluster):
    """The actors' base losses of a bf16 job are close to, but not, the float32 losses of the
    same model on the same rows (computed here)."""
    from untrac_ray.compute.evaluation import mean_loss
    from untrac_ray.compute.modeling import load_model
    from untrac_ray.run.job_setup import eval_sample, prepare_data

    job = write_job(tmp_path, {"methods": {"untrac_inv": None},
                               "resources": {"precision": "bf16"}})
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = cli("run", str(job), "--tracking-uri", uri, "--quiet")
    assert result.exit_code == 0, result.output
    run = only_run(uri)
    assert run.data.params["resources.precision"] == "bf16"
    spec = load_spec(job)
    data = prepare_data(spec)
    rows = eval_sample(spec, data)
    model = load_model(run.data.tags["untrac_ray.model_dir"])
    for name in ("next_number", "twice"):
        fp32 = mean_loss(model, data.tokenized(name), rows[name], spec.evaluation.batch_size)
        bf16 = run.data.metrics[f"base_loss/{name}"]
        assert bf16 != pytest.approx(fp32, rel=0, abs=1e-6)
        assert bf16 == pytest.approx(fp32, rel=0.05)
    assert np.isfinite(read_influence(run.info.run_id, uri).influence).all()


def test_the_gpu_check_runs_on_cpu_in_smoke_mode(capsys):
    """benchmarks/gpu_check.py: UnTrac's unlearning and evaluation throughput (GPU when lent)."""
    path = REPO / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--device", "cpu"])
    assert report["unlearn_tokens_per_s"] > 0 and report["eval_tokens_per_s"] > 0
    assert 0 < report["unlearn_fraction_of_matmul"] and np.isfinite(report["eval_loss"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["precision"] == "bf16"


def test_the_driver_trains_on_a_gpu_only_when_ray_gave_it_one():
    from untrac_ray.compute.training import driver_device

    in_job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}
    assert driver_device({}, cuda_available=True) == "cuda"  # a local run: the machine's GPU
    assert driver_device(in_job, cuda_available=True) == "cpu"  # a job given no GPU
    assert driver_device({**in_job, "CUDA_VISIBLE_DEVICES": "3"}, cuda_available=True) == "cuda"
    assert driver_device({**in_job, "CUDA_VISIBLE_DEVICES": ""}, cuda_available=True) == "cpu"
    assert driver_device({}, cuda_available=False) == "cpu"
