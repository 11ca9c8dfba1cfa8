"""cluster/ and jobs/pretraining/: every file parses, names only images, commands and files
that exist in the repository or are public, and the RayJob runs a valid `untrac-ray` command.
Nothing here downloads anything."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import ray
import typer
import yaml

import untrac_ray
from untrac_ray.cli import app
from untrac_ray.inputs.data import load_dataset_rows
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_sections import DatasetSpec

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


# ---------------------------------------------------------------- authentication


AUTH_SECRET = "untrac-ray-auth"
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_all(name: str) -> list:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else (
        manifest["spec"]["rayClusterSpec"])


def ray_containers(manifest: dict) -> list[tuple[str, dict]]:
    """(where, container) for every container that runs Ray or talks to it: the head's, every
    worker group's, the autoscaler's and the RayJob's submitter."""
    cluster = cluster_spec(manifest)
    found = [("head", c) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        found += [(f"worker {group['groupName']}", c)
                  for c in group["template"]["spec"]["containers"]]
    if cluster.get("enableInTreeAutoscaling"):
        found.append(("autoscaler", cluster.get("autoscalerOptions") or {}))
    if manifest["kind"] == "RayJob" and manifest["spec"].get("submissionMode",
                                                             "K8sJobMode") == "K8sJobMode":
        template = manifest["spec"].get("submitterPodTemplate")
        assert template, "the RayJob's submitter calls the Jobs API: it needs the token"
        found += [("submitter", c) for c in template["spec"]["containers"]]
    return found


def env_entries(node) -> list[dict]:
    """Every `env:` entry anywhere in a manifest."""
    if isinstance(node, dict):
        found = [e for e in node.get("env") or [] if isinstance(e, dict)]
        return found + [e for v in node.values() for e in env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in env_entries(v)]
    return []


def token_source(container: dict, pod_volumes: list[dict]) -> str | None:
    """The Secret the container's Ray token comes from (by env or a mounted file), or None."""
    env = {e["name"]: e for e in container.get("env") or []}
    if "RAY_AUTH_TOKEN" in env:
        ref = (env["RAY_AUTH_TOKEN"].get("valueFrom") or {}).get("secretKeyRef") or {}
        return ref.get("name") if ref.get("key") == "auth_token" else None
    if "RAY_AUTH_TOKEN_PATH" in env:
        path = env["RAY_AUTH_TOKEN_PATH"].get("value", "")
        for mount in container.get("volumeMounts") or []:
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                volume = next(v for v in pod_volumes if v["name"] == mount["name"])
                return (volume.get("secret") or {}).get("secretName")
    return None


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_turn_token_authentication_on_from_a_secret(name):
    docs = load_all(name)
    assert len(docs) == 1 and isinstance(docs[0], dict), "one manifest per file"
    manifest = docs[0]
    cluster = cluster_spec(manifest)
    # KubeRay's own switch (>= 1.6): the operator injects the token into every Ray container
    assert cluster["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    # ... and the same variables written out, for Ray itself under any operator
    containers = ray_containers(manifest)
    assert {where.split()[0] for where, _ in containers} >= {"head", "worker"}
    for where, container in containers:
        env = {e["name"]: e for e in container.get("env") or []}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        volumes = []
        if where == "head":
            volumes = cluster["headGroupSpec"]["template"]["spec"].get("volumes") or []
        assert token_source(container, volumes) == AUTH_SECRET, where
    # the dashboard and its Jobs API listen beyond loopback only with the token required
    host = cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    assert host in LOOPBACK or cluster["authOptions"]["mode"] == "token"
    # the Secret's creation and how submit finds the token are spelled out in the header
    text = (CLUSTER / name).read_text()
    assert f"kubectl create secret generic {AUTH_SECRET}" in text
    assert "RAY_AUTH_TOKEN_PATH" in text and "~/.ray/auth_token" in text


@pytest.mark.parametrize("name", KUBERAY)
def test_credentials_come_from_secrets_never_from_a_uri_or_the_command_line(name):
    manifest = load(name)
    secret_names = {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI"}
    entries = env_entries(manifest)
    assert entries
    for entry in entries:
        if entry["name"] in secret_names - {"MLFLOW_TRACKING_URI"}:
            assert "value" not in entry and entry["valueFrom"]["secretKeyRef"], entry
        if entry["name"] == "MLFLOW_TRACKING_URI" and "value" in entry:
            assert not urlsplit(entry["value"]).password, entry["name"]
    mlflow = {e["name"] for e in entries if e["name"].startswith("MLFLOW_TRACKING_")}
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= mlflow
    # no URI with a user or password anywhere in the manifest's values (the entrypoint included)
    values = json.dumps(manifest)
    assert not re.search(r"\w+://[^/\s\"'@]+@", values), "credentials in a URI"
    if manifest["kind"] == "RayJob":
        entrypoint = manifest["spec"]["entrypoint"]
        assert not re.search(r"(?i)password|secret|token=|MLFLOW_TRACKING_", entrypoint)
        argv = shlex.split(entrypoint)
        uri = urlsplit(argv[argv.index("--tracking-uri") + 1])
        assert uri.scheme == "http" and not uri.username and not uri.password


def policy_admits(policy: dict, port: int, same_namespace: bool, labels: dict,
                  namespace_labels: dict) -> bool:
    """Whether the NetworkPolicy lets a pod (its labels, its namespace's labels) reach `port`."""

    def selects(selector: dict | None, have: dict) -> bool:
        assert set(selector or {}) <= {"matchLabels"}, selector  # all this policy needs
        return all(have.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())

    for rule in policy["spec"].get("ingress") or []:
        ports = [p["port"] for p in rule.get("ports") or []]
        if ports and port not in ports:
            continue
        for peer in rule.get("from") or [{"everyone": True}]:
            assert "ipBlock" not in peer, peer
            if "everyone" in peer:
                return True
            if "namespaceSelector" in peer:
                in_ns = selects(peer["namespaceSelector"], namespace_labels)
            else:
                in_ns = same_namespace
            if in_ns and selects(peer.get("podSelector"), labels):
                return True
    return False


def test_the_network_policy_admits_only_the_namespace_to_the_head():
    docs = load_all("kuberay-networkpolicy.yaml")
    assert len(docs) == 1
    policy = docs[0]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert "namespace" not in policy["metadata"]  # applied in the cluster's namespace
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected == {"ray.io/node-type": "head",
                        "ray.io/cluster": load("kuberay-raycluster.yaml")["metadata"]["name"]}
    assert "Ingress" in policy["spec"]["policyTypes"]
    head = load("kuberay-raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    declared = [p["containerPort"] for c in head["containers"] for p in c.get("ports", [])]
    assert {6379, 8265, 10001} <= set(declared)
    worker = {"ray.io/node-type": "worker", "ray.io/cluster": "untrac-ray"}
    # in-namespace Ray traffic is untouched: declared ports and the ones Ray picks at random
    for port in [*declared, 52365, 8080, 10002, 45678]:
        assert policy_admits(policy, port, True, worker, {}), port
        assert policy_admits(policy, port, True, {"job-name": "submitter"}, {}), port
    # other namespaces: refused on every port, whatever their labels
    for port in [*declared, 52365, 45678]:
        assert not policy_admits(policy, port, False, worker, {"team": "x"}), port
        assert not policy_admits(policy, port, False, {}, {}), port
    # the KubeRay operator, from its own namespace, reaches the Jobs API only
    rule = next(r for r in policy["spec"]["ingress"]
                if any("namespaceSelector" in p for p in r["from"]))
    ns = rule["from"][0]["namespaceSelector"]["matchLabels"]
    operator = rule["from"][0]["podSelector"]["matchLabels"]
    assert ns and operator == {"app.kubernetes.io/name": "kuberay-operator"}
    assert policy_admits(policy, 8265, False, operator, ns)
    assert not policy_admits(policy, 6379, False, operator, ns)
    assert not policy_admits(policy, 8265, False, {"app": "other"}, ns)


# ---------------------------------------------------------------- cluster/local_head.py


@pytest.fixture(scope="module")
def local_head():
    spec = importlib.util.spec_from_file_location("local_head", CLUSTER / "local_head.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_local_head_creates_its_token_file_private_from_the_start(local_head, tmp_path,
                                                                   monkeypatch):
    """Even with umask 0 the folder is 700 and the token file 600, and every file opened in
    the folder on the way was 600 from its creation (never written first, chmod-ed later)."""
    state = tmp_path / "state"
    real_open = os.open
    opened = []

    def spy(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if Path(path).parent == state:
            opened.append((Path(path).name, os.fstat(fd).st_mode & 0o777, flags))
        return fd

    old_umask = os.umask(0)
    try:
        monkeypatch.setattr(os, "open", spy)
        local_head.private_folder(state)
        assert state.stat().st_mode & 0o777 == 0o700
        path = local_head.token_file(state)
        monkeypatch.setattr(os, "open", real_open)
    finally:
        os.umask(old_umask)
    assert path == state / "auth_token"
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert opened and all(mode == 0o600 and flags & os.O_EXCL for _, mode, flags in opened)
    assert [p.name for p in state.iterdir()] == ["auth_token"]  # no temporary file left
    # an existing token is kept (and its mode narrowed); an empty one is replaced
    assert local_head.token_file(state).read_text() == token
    path.chmod(0o644)
    local_head.token_file(state)
    assert path.read_text() == token and path.stat().st_mode & 0o777 == 0o600
    path.write_text("")
    assert re.fullmatch(r"[0-9a-f]{64}", local_head.token_file(state).read_text())
    # a state folder that already existed, readable by all, is made private
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    assert local_head.private_folder(tmp_path / "open").stat().st_mode & 0o777 == 0o700


def test_local_head_tells_ray_processes_by_name_not_by_a_mentioned_path(local_head):
    P = local_head.Proc
    temp = "/tmp/ur-x/ray"
    site = "/venv/lib/python3.11/site-packages/ray"
    procs = [
        P(10, 1, 10, "ray", ("/venv/bin/python3", "/venv/bin/ray", "start", "--block")),
        P(11, 10, 10, "gcs_server", (f"{site}/core/src/ray/gcs/gcs_server",)),
        P(12, 10, 10, "ray::IDLE", ("ray::IDLE",)),  # in the session: no path needed
        P(13, 12, 13, "sh", ("/bin/sh", "-c", "python job.py")),  # a job's driver, own session
        P(14, 13, 13, "python", ("python", "job.py")),
        P(20, 1, 20, "raylet", (f"{site}/core/src/ray/raylet/raylet",
                                f"--session_dir={temp}/session_1")),  # a leftover
        P(21, 1, 21, "python3", ("python3", "-u", f"{site}/dashboard/agent.py",
                                 f"--temp-dir={temp}")),  # a leftover
        P(30, 2, 30, "tail", ("tail", "-f", f"{temp}/session_latest/logs/raylet.out")),
        P(31, 2, 30, "vim", ("vim", f"{temp}/x")),
        P(32, 2, 30, "python3", ("python3", "-c", "import ray", f"{temp}/ray/dashboard/agent.py")),
        P(33, 2, 33, "raylet", (f"{site}/core/src/ray/raylet/raylet",
                                "--session_dir=/tmp/other/ray/session_1")),  # another Ray
        P(34, 2, 34, "python3", ("python3", "/home/me/ray-notes.py", f"{temp}/x")),
    ]
    assert local_head.processes_to_stop(procs, 10, temp, me=99) == {10, 11, 12, 13, 14, 20, 21}
    # an untrusted session (its id reused): only Ray's own processes in this temp dir
    assert local_head.processes_to_stop(procs, None, temp, me=99) == {20, 21}
    assert local_head.processes_to_stop(procs, 10, temp, me=14) == {10, 11, 12, 13, 20, 21}
    assert local_head.is_ray_process("python3", ["python3", "-m", "ray.util.client.server"])
    assert not local_head.is_ray_process("python3", ["python3", "-m", "ray_notes"])
    assert local_head.has_path_under(["--temp-dir", temp], temp)
    assert not local_head.has_path_under([f"{temp}-other/x"], temp)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_local_head_stop_kills_its_session_and_leaves_bystanders_alone(local_head, tmp_path):
    """A fake head (no Ray): a session of its own with a child in it and a child in a session
    of its own (a job's driver), recorded as `start` records it. `stop` kills those three and
    a Ray-named leftover in the head's temp dir, and leaves alone a `tail -f` of a file in the
    state folder, a process sitting in it, and a Ray-named process of another temp dir."""
    import psutil

    state = local_head.private_folder(tmp_path / "s")
    temp_dir = state / "ray"
    (temp_dir / "session_latest" / "logs").mkdir(parents=True)
    log = temp_dir / "session_latest" / "logs" / "raylet.out"
    log.write_text("")
    agent = tmp_path / "site-packages" / "ray" / "dashboard" / "agent.py"
    agent.parent.mkdir(parents=True)
    agent.write_text("import time\ntime.sleep(300)\n")
    fake_head = ("import subprocess, time\n"
                 "a = subprocess.Popen(['sleep', '300'])\n"
                 "b = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                 "print(a.pid, b.pid, flush=True)\n"
                 "time.sleep(300)\n")
    started = []
    try:
        head = subprocess.Popen([sys.executable, "-c", fake_head, f"--temp-dir={temp_dir}"],
                                start_new_session=True, stdout=subprocess.PIPE, text=True)
        started.append(head)
        in_session, own_session = map(int, head.stdout.readline().split())
        bystanders = [subprocess.Popen(["tail", "-f", str(log)]),
                      subprocess.Popen(["sleep", "300"], cwd=temp_dir),
                      subprocess.Popen([sys.executable, str(agent),
                                        f"--temp-dir={tmp_path / 'other' / 'ray'}"])]
        leftover = subprocess.Popen([sys.executable, str(agent), f"--session-dir={temp_dir}/s"])
        started += [*bystanders, leftover]
        (state / "head.json").write_text(json.dumps({
            "pid": head.pid, "sid": head.pid,
            "create_time": psutil.Process(head.pid).create_time(),
            "url": "http://127.0.0.1:1", "token_file": str(state / "auth_token"),
            "temp_dir": str(temp_dir), "state": str(state)}))
        ours = {head.pid, in_session, own_session, leftover.pid}
        seen = local_head.snapshot()
        chosen = local_head.processes_to_stop((p for p, _ in seen.values()), head.pid,
                                              str(temp_dir))
        assert ours <= chosen and not chosen & {b.pid for b in bystanders}

        assert local_head.stop(state) is True
        assert all(_gone(pid) for pid in ours)
        assert all(b.poll() is None for b in bystanders), "stop killed a bystander"
        assert not (state / "head.json").exists()
        assert local_head.stop(state) is False  # nothing left to stop
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for pid in (locals().get("in_session"), locals().get("own_session")):
            if pid and not _gone(pid):
                os.kill(pid, 9)


def test_local_head_stop_does_not_take_a_reused_pid_for_its_head(local_head, tmp_path):
    """A record whose pid now names another process (another start time): `stop` leaves that
    process and its session alone."""
    import psutil

    state = local_head.private_folder(tmp_path / "s")
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        created = psutil.Process(other.pid).create_time()
        (state / "head.json").write_text(json.dumps({
            "pid": other.pid, "sid": other.pid, "create_time": created - 1000,
            "temp_dir": str(state / "ray"), "url": "http://127.0.0.1:1",
            "token_file": str(state / "auth_token"), "state": str(state)}))
        assert local_head.read_state(state) is None  # not running: its pid is someone else's
        local_head.stop(state)
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=10)


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
