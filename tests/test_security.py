"""Credentials never leave as text, and an embedded run listens on loopback only.

The end-to-end test runs `untrac-ray run` as a real process against a real MLflow server with
basic authentication (its admin password is the secret passed in --tracking-uri), with other
secrets in the spec's tracking.uri and in a data source URI, and greps everything the run
wrote or printed. The submit test stages a job and builds the Jobs API request without a
cluster, and checks that the staged job file, loaded on "the cluster" with the job's
environment, gives back the same URIs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from conftest import tiny_spec
from untrac_ray.inputs import redaction
from untrac_ray.inputs.errors import DataError, SpecError
from untrac_ray.inputs.loading import load_spec
from untrac_ray.submit.staging import entrypoint, job_request, stage_job

SPEC_SECRET = "SpecPass7731"  # in the spec's tracking.uri (unused: --tracking-uri wins)
CLI_SECRET = "CliPass5526x"  # the MLflow server's admin password, in --tracking-uri
DATA_SECRET = "DataTok90417"  # a token in a data source URI's query
SECRETS = (SPEC_SECRET, CLI_SECRET, DATA_SECRET)


# ---------------------------------------------------------------- the rule, by hand


def test_redact_masks_userinfo_secret_query_values_and_learnt_secrets():
    r = redaction.redact
    assert r("http://alice:pw@host:5000/x") == "http://***@host:5000/x"
    assert r("see s3://b/k.csv?X-Amz-Signature=abc&part=2 now") == (
        "see s3://b/k.csv?X-Amz-Signature=***&part=2 now")
    assert r("https://h/d.csv?token=t0k&page=2") == "https://h/d.csv?token=***&page=2"
    assert r("sqlite:////tmp/m.db and http://host:5000") == "sqlite:////tmp/m.db and http://host:5000"
    assert r("user@example.com") == "user@example.com"  # not a URI
    redaction.learn("http://bob:LearntPass1@h")
    assert r("error: LearntPass1 refused") == "error: *** refused"
    redaction.learn_environment({"MLFLOW_TRACKING_PASSWORD": "EnvPass12345",
                                 "RAY_AUTH_TOKEN_PATH": "/home/me/token", "HOME": "/home/me"})
    assert r("EnvPass12345 in /home/me/token") == "*** in /home/me/token"
    assert DataError("cannot read http://u:p4ss@h/x.csv").args[0] == (
        "cannot read http://***@h/x.csv")


def test_the_redacting_stream_reports_its_streams_state_after_it_closed():
    import io

    inner = io.StringIO()
    stream = redaction.RedactingStream(inner)
    stream.write("http://bob:pw1234@host/")
    assert inner.getvalue() == "http://***@host/" and not stream.closed
    inner.close()  # e.g. a test runner's capture, before an atexit hook asks for a terminal
    assert stream.closed and not stream.isatty()


def test_credentials_become_environment_variables_and_placeholders():
    assert redaction.split_credentials("http://alice:p%40ss@host:5000/p") == (
        "http://host:5000/p",
        {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss"})
    assert redaction.split_credentials("http://host:5000") == ("http://host:5000", {})
    text, env = redaction.to_placeholders(
        "a: http://u:pw@h\nb: s3://b/x?sig=zz&n=1\nc: http://u:pw@h2\n")
    assert text == ("a: http://${UNTRAC_RAY_SECRET_0}@h\nb: s3://b/x?sig=${UNTRAC_RAY_SECRET_1}"
                    "&n=1\nc: http://${UNTRAC_RAY_SECRET_0}@h2\n")
    assert env == {"UNTRAC_RAY_SECRET_0": "u:pw", "UNTRAC_RAY_SECRET_1": "zz"}
    assert redaction.expand_env(text, env) == (
        "a: http://u:pw@h\nb: s3://b/x?sig=zz&n=1\nc: http://u:pw@h2\n")


def test_a_spec_reads_secrets_from_the_environment(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path)
    spec["tracking"] = {"uri": "http://me:${UNTRAC_TEST_PW}@mlflow:5000"}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"tracking.uri: \$\{UNTRAC_TEST_PW\} is not set"):
        load_spec(job)
    monkeypatch.setenv("UNTRAC_TEST_PW", "FromEnvPw99")
    assert load_spec(job).tracking.uri == "http://me:FromEnvPw99@mlflow:5000"


# ---------------------------------------------------------------- submit


def test_a_submitted_job_carries_its_secrets_only_as_environment_variables(tmp_path):
    spec = tiny_spec(tmp_path)
    spec["tracking"] = {"uri": f"http://alice:{SPEC_SECRET}@mlflow:5000"}
    remote = f"s3://AKIAEXAMPLE:{DATA_SECRET}@bucket/train.csv?X-Amz-Security-Token=Sess88321"
    spec["data"]["train"][0]["source"] = remote
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    staged = stage_job(job)
    try:
        cli_uri = f"http://bob:{CLI_SECRET}@mlflow:5000"
        request = job_request(staged, cli_uri, "sid-1", environ={})
        env_vars = request["runtime_env"]["env_vars"]
        shown = json.dumps({**request, "runtime_env": {**request["runtime_env"],
                                                       "env_vars": sorted(env_vars)}})
        staged_text = (staged.folder / "job.yaml").read_text()
        for secret in (*SECRETS, "Sess88321"):
            assert secret not in shown and secret not in staged_text
            assert secret not in repr(staged) and secret not in " ".join(staged.passed)
        assert "--tracking-uri http://mlflow:5000" in request["entrypoint"]
        assert env_vars["MLFLOW_TRACKING_USERNAME"] == "bob"
        assert env_vars["MLFLOW_TRACKING_PASSWORD"] == CLI_SECRET
        # `stop` interrupts the driver and gives it time to close its run KILLED
        assert env_vars["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
        assert int(env_vars["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30
        # on the cluster, the job's environment fills the staged file back in
        on_cluster = {k: v for k, v in env_vars.items() if k.startswith("UNTRAC_RAY_SECRET_")}
        old = {k: os.environ.get(k) for k in on_cluster}
        os.environ.update(on_cluster)
        try:
            loaded = load_spec(staged.folder / "job.yaml")
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        assert loaded.data.train[0].source == remote
        assert loaded.tracking.uri == spec["tracking"]["uri"]
        # credentials of this shell travel the same way when the URI has none
        request = job_request(staged, "http://mlflow:5000", "sid-2",
                              environ={"MLFLOW_TRACKING_TOKEN": "ShellTok6611"})
        assert request["runtime_env"]["env_vars"]["MLFLOW_TRACKING_TOKEN"] == "ShellTok6611"
        assert "ShellTok6611" not in request["entrypoint"] + json.dumps(request["metadata"])
    finally:
        staged.cleanup()
    with pytest.raises(Exception, match="never goes on a command line"):
        entrypoint("python", cli_uri)


# ---------------------------------------------------------------- a real run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow server with basic authentication on loopback; its admin password is
    CLI_SECRET. Yields (url without credentials, folder holding its store and artifacts)."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    folder = tmp_path_factory.mktemp("mlflow-server")
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = EDIT\n"
        # MLflow's own cache of successful credential checks (off by default): without it the
        # server runs its deliberately slow password hash on every one of the run's requests.
        # A wrong password is never cached, so the test below still sees it refused.
        "auth_cache_ttl_seconds = 600\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {CLI_SECRET}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key"}
    (folder / "store").mkdir()
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{folder / 'store' / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "store" / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (
            (folder / "server.log").read_text()[-2000:])
        time.sleep(0.3)
    assert requests.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                        timeout=5).status_code == 401  # it really wants credentials
    yield url, folder / "store"
    os.killpg(proc.pid, 9)
    proc.wait()
    log.close()


def _listening(pids: set[int]) -> set[tuple[str, int, int]]:
    return {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _tree(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _files_holding(folder: Path, secrets: tuple[str, ...]) -> list[str]:
    found = []
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            found += [f"{f}: {s}" for s in secrets if s.encode() in data]
    return found


def test_an_embedded_run_prints_and_logs_no_secret_and_listens_on_loopback_only(
        tmp_path, mlflow_server):
    url, store = mlflow_server
    spec = tiny_spec(tmp_path)
    spec["tracking"] = {"uri": f"http://alice:{SPEC_SECRET}@127.0.0.1:9/", "experiment": "sec"}
    train = spec["data"]["train"][0]
    train["source"] = f"file://{tmp_path / train['source']}?token={DATA_SECRET}"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    cli_uri = url.replace("://", f"://admin:{CLI_SECRET}@")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["UNTRAC_RAY_STORE_TIMEOUT_S"] = "60"  # the server's first password check is slow
    proc = subprocess.Popen(
        [sys.executable, "-m", "untrac_ray.cli", "run", str(job), "--tracking-uri", cli_uri],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sockets: set[tuple[str, int, int]] = set()
    names: dict[int, str] = {}
    while proc.poll() is None:
        pids = _tree(proc.pid)
        for pid in pids:
            try:
                names[pid] = psutil.Process(pid).name()  # the latest: a child seen between
                # its fork and its exec is still called "python" (gcs_server was, once)
            except psutil.NoSuchProcess:
                pass
        sockets |= _listening(pids)
        time.sleep(0.3)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]

    for secret in SECRETS:
        assert secret not in out and secret not in err, secret
    assert not _files_holding(store, SECRETS)
    assert not _files_holding(tmp_path / "cache", SECRETS)
    assert "MLflow run" in out and "http://***@" + url.split("://")[1] in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cli_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sec").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == "http://***@127.0.0.1:9/"
    assert run.data.params["data.train.0.source"].endswith("?token=***")

    # Ray's processes (GCS, raylet, workers, agents) listened, and only on loopback
    assert {"gcs_server", "raylet"} <= set(names.values()), names
    assert len(sockets) >= 5, sockets
    wide = {(ip, port, names.get(pid)) for ip, port, pid in sockets
            if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    assert not wide, wide

    listed = subprocess.run(
        [sys.executable, "-m", "untrac_ray.cli", "runs", "--tracking-uri", cli_uri,
         "--experiment", "sec"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert CLI_SECRET not in listed.stdout + listed.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "untrac_ray.cli", "runs", "--tracking-uri",
         url.replace("://", "://admin:WrongPass4242@")], capture_output=True, text=True,
        env=env, cwd=tmp_path)
    assert wrong.returncode != 0 and "WrongPass4242" not in wrong.stdout + wrong.stderr
    assert "***@127.0.0.1" in wrong.stderr


def _command_lines(pid: int) -> list[str]:
    """The command lines of a process's descendants (its own is the user's, as typed, and so
    is that of a child caught between its fork and its exec)."""
    try:
        own = psutil.Process(pid).cmdline()
    except psutil.Error:
        return []
    out = []
    for p in _tree(pid) - {pid}:
        try:
            line = psutil.Process(p).cmdline()
        except psutil.Error:
            continue
        if line != own:
            out.append(" ".join(line))
    return out


def test_a_search_and_its_resume_store_and_show_no_secret(tmp_path, mlflow_server):
    """`tune` against the password-protected server, killed after a trial, then `tune
    --resume` with the password in MLflow's environment variables only: no secret in what
    they print, in any of their processes' command lines, in the MLflow store, in Tune's
    storage folder (its state file, best_job.yaml) or in the cache."""
    url, store = mlflow_server
    (tmp_path / "metric.py").write_text(  # slow rounds, so that the kill lands mid-search
        "import time\n"
        "def slow(table, truth):\n"
        "    time.sleep(1.0)\n"
        "    return float(table['influence'].mean())\n")
    spec = tiny_spec(tmp_path)
    spec["tracking"] = {"uri": f"http://alice:{SPEC_SECRET}@127.0.0.1:9/", "experiment": "tune"}
    train = spec["data"]["train"][0]
    train["source"] = f"file://{tmp_path / train['source']}?token={DATA_SECRET}"
    spec["methods"] = {"untrac": {"eval_points": 2}, "ldo": {}}
    spec["resources"] = {"local_cpus": 2}
    spec["search"] = {"space": {"untrac.learning_rate": [1e-4, 1e-2]},
                      "algorithm": "grid", "objective": {"function": "metric.py:slow"},
                      "max_concurrent": 1, "storage_path": str(tmp_path / "tune")}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    cli_uri = url.replace("://", f"://admin:{CLI_SECRET}@")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["UNTRAC_RAY_STORE_TIMEOUT_S"] = "60"
    lines: list[str] = []

    def watch(proc: subprocess.Popen, until) -> None:
        deadline = time.monotonic() + 600
        while proc.poll() is None and not until():
            lines.extend(_command_lines(proc.pid))
            assert time.monotonic() < deadline, "the search took too long"
            time.sleep(0.3)

    def finished_trials() -> int:
        return sum(json.loads(f.read_text().splitlines()[-1]).get("round") == 2
                   for f in (tmp_path / "tune").glob("*/run_trial_*/result.json")
                   if f.read_text().strip())

    first = subprocess.Popen(
        [sys.executable, "-m", "untrac_ray.cli", "tune", str(job), "--tracking-uri", cli_uri,
         "-q"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    watch(first, lambda: finished_trials() >= 1)
    time.sleep(1.5)  # Tune saves its state every second
    os.killpg(first.pid, 9)
    out1, err1 = first.communicate()

    resume_env = {**env, "MLFLOW_TRACKING_USERNAME": "admin",
                  "MLFLOW_TRACKING_PASSWORD": CLI_SECRET}
    second = subprocess.Popen(
        [sys.executable, "-m", "untrac_ray.cli", "tune", str(job), "--resume", "-q"],
        cwd=tmp_path, env=resume_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    watch(second, lambda: False)
    out2, err2 = second.communicate()
    assert second.returncode == 0, err2[-3000:]
    assert (tmp_path / "tune").is_dir() and list((tmp_path / "tune").rglob("best_job.yaml"))

    for secret in SECRETS:
        assert secret not in out1 + err1 + out2 + err2, secret
        assert not [line for line in lines if secret in line], secret
    assert lines and any("ray::" in line or "raylet" in line for line in lines)
    assert not _files_holding(store, SECRETS)
    written = [f for f in _files_holding(tmp_path, SECRETS) if not f.startswith(f"{job}:")]
    assert not written  # Tune's storage, the cache, the job's folder (but the job file)
    best = next((tmp_path / "tune").rglob("best_job.yaml")).read_text()
    assert f"tracking_uri: {url}" in best and "token=***" in best
