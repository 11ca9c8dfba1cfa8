"""MLflow, and only here: one run per job with params, metrics, tables, figures and the spec.

Only the driver writes (SQLite does not like concurrent writers); actors return results to it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from untrac_ray.inputs.errors import TrackingError
from untrac_ray.inputs.redaction import learn, redact
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.results.tables import with_points

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_PREFIX = "untrac_ray."
HEADLINE_TAG = "headline_pearson"  # method=mean Pearson at the point fixed in advance
TASKS = "tasks"  # the artifact folder of a run's finished tasks (task_store.py)


class RedactingClient(MlflowClient):
    """An MlflowClient whose writes of text (params, tags, text artifacts) pass through
    redaction.redact: no credential reaches the store, whatever a spec or an error held."""

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
        return super().create_run(experiment_id, start_time=start_time, tags=tags,
                                  run_name=run_name)

    def set_tag(self, run_id, key, value, synchronous=None):
        return super().set_tag(run_id, key, redact(str(value)), synchronous=synchronous)

    def log_param(self, run_id, key, value, synchronous=None):
        return super().log_param(run_id, key, redact(str(value)), synchronous=synchronous)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        params = [Param(p.key, redact(p.value)) for p in params]
        tags = [RunTag(t.key, redact(t.value)) for t in tags]
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags,
                                 synchronous=synchronous)

    def log_text(self, run_id, text, artifact_file):
        return super().log_text(run_id, redact(text), artifact_file)


def resolve_tracking_uri(cli_uri: str | None, spec: JobSpec | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the spec's tracking.uri, else SQLite."""
    uri = (
        cli_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (spec.tracking.uri if spec is not None else None)
        or DEFAULT_TRACKING_URI
    )
    learn(uri)  # its password, if any, is masked wherever it would be printed or logged
    return uri


def metric_key(*parts: str) -> str:
    """A metric name from parts, with characters MLflow refuses replaced by '_'."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", p) for p in parts)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists as dotted keys, e.g. methods.untrac.learning_rate."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = str(value)[:6000]
    return out


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store, keep artifacts in a folder beside the database file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


STORE_TIMEOUT_S = "UNTRAC_RAY_STORE_TIMEOUT_S"  # the quick check's deadline (default 10 s)


def check_store(uri: str, timeout_s: float | None = None) -> None:
    """Raise TrackingError (one line) unless the tracking store can be used: a server answers
    within timeout_s (one try, not MLflow's minutes of retries), a SQLite file's folder can be
    made. Called before any data, training or Ray, so a bad store costs seconds, not a job.

    An existing SQLite file is opened under the store's lock (see _prepare_store): a schema a
    peer is still creating is waited for, an out-of-date or corrupt file fails here. A new
    file is not created yet (a job failing its checks leaves nothing behind): JobRun creates
    it, under the same lock, so jobs started together on a new store do not race."""
    if uri.startswith("sqlite:///"):
        db = _sqlite_path(uri)
        if db is None:
            return
        if db.is_dir():
            raise TrackingError(f"tracking store {uri}: {db} is a folder, not a database file")
        try:
            db.resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"tracking store {uri}: cannot create its folder: "
                                f"{err.strerror or err}") from None
        if db.exists():
            _ensure_sqlite_schema(uri, db.resolve())
        return
    if not uri.startswith(("http://", "https://")):
        return
    if timeout_s is None:  # a server checking passwords on a busy machine may take seconds
        timeout_s = float(os.environ.get(STORE_TIMEOUT_S, "10"))
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s)))}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - refused, timed out, not an MLflow server ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        slow = f" (no answer in {timeout_s:g} s: {STORE_TIMEOUT_S} sets how long to wait)" if (
            "timeout" in reason.lower()) else ""
        raise TrackingError(f"tracking store {uri} cannot be reached: {reason[:300]}{slow}"
                            ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _prepare_store(uri: str) -> None:
    """Before a job's first write: a SQLite store's folder is made (OSError if it cannot be)
    and its schema created, or checked, under the store's lock (TrackingError, one line)."""
    db = _sqlite_path(uri)
    if db is None:
        return
    db = db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    _ensure_sqlite_schema(uri, db)


STORE_LOCK_TIMEOUT_S = 300.0  # a peer creating or migrating the schema takes seconds


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (its ?query left out); None if not one, or an
    in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(name)


def _ensure_sqlite_schema(uri: str, db: Path) -> None:
    """Make sure the SQLite store's MLflow schema exists, holding an exclusive lock on
    `<db>.lock` (fcntl.flock, beside the database) while MLflow opens it.

    MLflow's SqlAlchemyStore creates every table and runs every migration, each DDL statement
    committed apart and unlocked, on the first open of a new database file: two processes
    doing it at once fail with `table ... already exists`, `duplicate column name`. Under the
    lock exactly one process creates the schema; the others wait, then find it complete.
    Everyone takes the lock, even on an existing file (a peer may be halfway through); it
    costs milliseconds. The lock file stays (removing it would let two holders in). A file
    already at MLflow's latest schema revision is complete: no lock then, so that many jobs
    opening one store do not queue behind each other."""
    import fcntl  # Unix only, as are Ray's local clusters

    if _schema_is_current(db):
        return
    lock_path = db.with_name(db.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise TrackingError(f"tracking store {uri}: cannot create its lock file {lock_path}: "
                            f"{err.strerror or err}") from None
    try:
        deadline = time.monotonic() + STORE_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"tracking store {uri}: another process has held {lock_path} for over "
                        f"{STORE_LOCK_TIMEOUT_S:.0f} s (creating the schema?)") from None
                time.sleep(0.05)
        try:
            # Opening the store creates the tables and runs the migrations if needed, then
            # checks the schema version and the default experiment; one query to be sure.
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - corrupt file, out-of-date schema, ...
            text = str(err).strip()
            reason = text.splitlines()[0] if text else type(err).__name__
            raise TrackingError(f"tracking store {uri} cannot be used: {reason[:300]}") from None
    finally:
        os.close(fd)  # releases the lock


def _schema_is_current(db: Path) -> bool:
    """Whether the SQLite file records MLflow's latest schema revision (its migrations all
    ran; a schema being created has an older one or none), read without MLflow or a lock."""
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision

    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        con = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            con.close()
        return row is not None and row[0] == _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - not a database, no such table, locked, ...: take the lock
        return False


def _get_or_create_experiment(client: MlflowClient, name: str,
                              artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing. Two jobs starting together in a new
    experiment both find it missing and both create it; the one that loses the race
    (RESOURCE_ALREADY_EXISTS, a UNIQUE constraint on SQLite) reads the winner's."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


HEARTBEAT_TAG = "heartbeat"  # unix seconds, refreshed by a live driver
HEARTBEAT_S = float(os.environ.get("UNTRAC_RAY_HEARTBEAT_S", "30"))
STALE_AFTER = 3  # heartbeats missed before a RUNNING run counts as stale


class JobRun:
    """An MLflow run for one job. FINISHED only when the `with` block ends without error.

    With `run_id` it continues that run (`--resume`): status back to RUNNING, no new params.
    While open, a thread refreshes the heartbeat tag so that a run whose driver was killed
    (SIGKILL, a lost node) is recognisable as stale, and adoptable by `--resume`. The run
    also keeps the job's finished tasks (task_store.Remote: artifacts under tasks/).
    """

    def __init__(self, spec: JobSpec, tracking_uri: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None):
        self.spec = spec
        self.uri = tracking_uri
        self.extra_tags = tags or {}
        self.client: MlflowClient | None = None
        self.run_id = ""
        self.resume_id = run_id
        self.resumed = False
        self._beat: threading.Event | None = None

    def __enter__(self) -> JobRun:
        _prepare_store(self.uri)
        if self.resume_id is not None:
            self._reopen(self.resume_id)
        else:
            self._create()
        self._start_heartbeat()
        return self

    def _create(self) -> None:
        try:
            self.client = RedactingClient(tracking_uri=self.uri)
            exp_id = _get_or_create_experiment(self.client, self.spec.tracking.experiment,
                                               _artifact_root(self.uri))
        except Exception as err:  # noqa: BLE001
            raise TrackingError(f"cannot use MLflow store {self.uri}: {err}") from None
        tags = {
            TAG_PREFIX + "job": self.spec.name,
            TAG_PREFIX + "methods": ",".join(self.spec.methods.enabled()),
            TAG_PREFIX + "model": self.spec.model.path or self.spec.model.config["model_type"],
            TAG_PREFIX + "n_train": str(len(self.spec.data.train)),
            TAG_PREFIX + "n_test": str(len(self.spec.data.test)),
            **self.extra_tags,
        }
        run = self.client.create_run(
            exp_id, run_name=f"{self.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(self.spec.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.log_text(self.spec.to_yaml(), "job.yaml")

    def _reopen(self, run_id: str) -> None:
        self.client = RedactingClient(tracking_uri=self.uri)
        try:
            self.client.get_run(run_id)
        except Exception as err:  # noqa: BLE001
            raise TrackingError(f"the MLflow run {run_id} is not in {self.uri}: "
                                f"{str(err).splitlines()[0]}") from None
        self.run_id = run_id
        self.resumed = True
        self.client.update_run(run_id, status="RUNNING")
        for key, value in self.extra_tags.items():
            self.client.set_tag(run_id, key, value)
        if TAG_PREFIX + "error" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, TAG_PREFIX + "error")  # the last try's error

    def _start_heartbeat(self) -> None:
        """Tag the driver (host, pid) and refresh the heartbeat from a daemon thread."""
        self.client.set_tag(self.run_id, TAG_PREFIX + "driver", f"{socket.gethostname()}:"
                            f"{os.getpid()}")
        self.client.set_tag(self.run_id, TAG_PREFIX + "heartbeat_s", f"{HEARTBEAT_S:g}")
        stop = self._beat = threading.Event()
        client, run_id = RedactingClient(tracking_uri=self.uri), self.run_id

        def beat() -> None:
            while True:
                with contextlib.suppress(Exception):  # a store that hiccups: try next time
                    client.set_tag(run_id, TAG_PREFIX + HEARTBEAT_TAG, f"{time.time():.0f}")
                if stop.wait(HEARTBEAT_S):
                    return

        threading.Thread(target=beat, name="untrac-ray-heartbeat", daemon=True).start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._beat is not None:
            self._beat.set()
        if self.client is None or not self.run_id:
            return
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
            self.client.set_tag(self.run_id, TAG_PREFIX + "error", str(exc)[:5000])
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    # --- the run's finished tasks (task_store.Remote) ---

    def stored_task_keys(self) -> set[str]:
        """Keys of the finished tasks stored in this run."""
        names = [Path(a.path).name for a in self.client.list_artifacts(self.run_id, TASKS)]
        return {n.removesuffix(".npz") for n in names if n.endswith(".npz")}

    def read_task(self, key: str) -> bytes:
        """The bytes of one stored task."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(self.run_id, f"{TASKS}/{key}.npz", tmp)
            return Path(path).read_bytes()

    def store_task(self, path: Path) -> None:
        """Store one finished task's file in the run."""
        self.client.log_artifact(self.run_id, str(path), TASKS)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, TAG_PREFIX + key, value)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Log many metrics in one call."""
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_base_losses(self, losses: dict[str, float]) -> None:
        self.log_metrics({metric_key("base_loss", name): v for name, v in losses.items()})

    def log_cells(self, rows: list[dict]) -> None:
        """Every cell's influence, keyed influence/<method>/<train>/<test>, at its evaluation
        point (the MLflow step: trajectories of sets of any size line up by point)."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(metric_key("influence", r["method"], r["train_set"], r["test_set"]),
                   float(r["influence"]), now, int(r["point"]))
            for r in rows
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_scores(self, scores: pd.DataFrame, summary: pd.DataFrame) -> None:
        """Correlations with the ground truth: metrics per evaluation point, the tables, and
        the headline tag (each method's mean Pearson at its point fixed in advance)."""
        now = int(time.time() * 1000)
        metrics = []
        for r in scores.itertuples():
            name = {"__mean__": "mean", "__all__": "all"}.get(r.test_set, r.test_set)
            for stat in ("pearson", "spearman"):
                value = getattr(r, stat)
                if value == value:  # not NaN
                    metrics.append(Metric(metric_key("score", r.method, f"{stat}_{name}"),
                                          float(value), now, int(r.point)))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        self.log_table(scores, "scores")
        self.log_table(summary, "score_summary")
        headline = ",".join(f"{r.method}={r.pearson_mean:.3f}" for r in summary.itertuples())
        self.set_tag(HEADLINE_TAG, headline)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, table: pd.DataFrame, stem: str) -> None:
        """A table as Parquet and CSV artifacts (stem may hold a folder: examples/top)."""
        folder, name = os.path.split(stem)
        with tempfile.TemporaryDirectory() as tmp:
            for suffix, write in ((".parquet", table.to_parquet), (".csv", table.to_csv)):
                path = Path(tmp, name + suffix)
                write(path, index=False)
                self.client.log_artifact(self.run_id, str(path), folder or None)

    def log_figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, fig, artifact_file)
        plt.close(fig)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True), artifact_file)


def read_influence(run_id: str, tracking_uri: str) -> pd.DataFrame:
    """The tidy influence table a run logged."""
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        raise TrackingError(f"run {run_id} not found in {tracking_uri}: {err}") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="influence.parquet", dst_path=tmp,
            tracking_uri=tracking_uri,
        )
        return with_points(pd.read_parquet(path))


# --- Reading runs back: `untrac-ray runs`, `show`, `compare` and `ui` (browse.py formats) ---

from dataclasses import dataclass, field  # noqa: E402

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class RunRecord:
    """What the browse commands show of one run, read from the tracking store."""

    run_id: str
    run_name: str
    experiment: str
    experiment_id: str
    job: str
    methods: list[str]
    model: str
    n_train: int | None
    n_test: int | None
    status: str
    start_ms: int | None
    end_ms: int | None
    parent_id: str | None
    headline_pearson: dict[str, float]
    error: str | None
    tags: dict[str, str] = field(default_factory=dict)
    stale: bool = False  # RUNNING, but its driver is gone or silent (see driver_is_gone)


def _headline_pearson(tags: dict[str, str], metrics: dict[str, float]) -> dict[str, float]:
    """Each method's headline correlation (mean Pearson at its point fixed in advance): the
    headline tag, else the newest score metrics (runs before the tag: their last point)."""
    out: dict[str, float] = {}
    for part in tags.get(TAG_PREFIX + HEADLINE_TAG, "").split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            continue
    if not out:
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "score" and parts[2] == "pearson_mean":
                out[parts[1]] = float(value)
    return {k: v for k, v in out.items() if k and v == v}


def _record(run, experiments: dict[str, str]) -> RunRecord:
    tags = dict(run.data.tags)

    def count(key: str) -> int | None:
        value = tags.get(TAG_PREFIX + key, "")
        return int(value) if value.isdigit() else None

    methods = [m for m in tags.get(TAG_PREFIX + "methods", "").split(",") if m]
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        experiment=experiments.get(run.info.experiment_id, run.info.experiment_id),
        experiment_id=run.info.experiment_id,
        job=tags.get(TAG_PREFIX + "job", ""),
        methods=methods,
        model=tags.get(TAG_PREFIX + "model", ""),
        n_train=count("n_train"),
        n_test=count("n_test"),
        status=run.info.status,
        start_ms=run.info.start_time,
        end_ms=run.info.end_time,
        parent_id=tags.get("mlflow.parentRunId"),
        headline_pearson=_headline_pearson(tags, dict(run.data.metrics)),
        error=tags.get(TAG_PREFIX + "error"),
        tags=tags,
        stale=run.info.status == "RUNNING" and driver_is_gone(tags),
    )


def driver_is_gone(tags: dict[str, str], now: float | None = None) -> bool:
    """True when a RUNNING run's driver is dead or silent: its process is gone (a driver on
    this host), or it missed STALE_AFTER heartbeats. Runs from before heartbeats: never."""
    host, _, pid = tags.get(TAG_PREFIX + "driver", "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
        return True
    try:
        last = float(tags[TAG_PREFIX + HEARTBEAT_TAG])
        every = float(tags.get(TAG_PREFIX + "heartbeat_s", HEARTBEAT_S))
    except (KeyError, ValueError):
        return False
    return (now or time.time()) - last > STALE_AFTER * every


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def find_resumable_run(tracking_uri: str, spec: JobSpec, spec_key: str,
                       kind: str | None = None) -> RunRecord:
    """The newest unfinished run of this job (same name and spec hash) that `--resume` can
    continue: KILLED, FAILED, or RUNNING with its driver gone. TrackingError (one line)
    when there is none, saying why (nothing unfinished, a live driver, a changed spec)."""
    if not _store_exists(tracking_uri):
        raise TrackingError(f"nothing to resume: no MLflow store at {tracking_uri}")
    job = spec.name.replace("'", "")
    records = [r for r in list_runs(tracking_uri, None, f"tags.`{TAG_PREFIX}job` = '{job}'",
                                    limit=200)
               if r.tags.get(TAG_PREFIX + "kind") == kind and r.parent_id is None]
    where = f"job {spec.name!r} in {tracking_uri}"
    if not records:
        raise TrackingError(f"nothing to resume: no run of {where}; run without --resume")
    unfinished = [r for r in records if r.status in ("KILLED", "FAILED")
                  or (r.status == "RUNNING" and r.stale)]
    same = [r for r in unfinished if r.tags.get(TAG_PREFIX + "spec_key") == spec_key]
    if same:
        return same[0]
    live = [r for r in records if r.status == "RUNNING" and not r.stale
            and r.tags.get(TAG_PREFIX + "spec_key") == spec_key]
    if live:
        beat = live[0].tags.get(TAG_PREFIX + HEARTBEAT_TAG)
        ago = f", heartbeat {time.time() - float(beat):.0f} s ago" if beat else ""
        raise TrackingError(f"nothing to resume: run {live[0].run_id} of {where} is still "
                            f"running (driver {live[0].tags.get(TAG_PREFIX + 'driver', '?')}"
                            f"{ago})")
    if unfinished:
        r = unfinished[0]
        raise TrackingError(f"cannot resume run {r.run_id} of {where}: it was made by a "
                            f"different spec (settings hash {r.tags.get(TAG_PREFIX + 'spec_key')}"
                            f", now {spec_key}); run without --resume for a new run")
    raise TrackingError(f"nothing to resume: every run of {where} finished (latest "
                        f"{records[0].run_id}); run without --resume for a new run")


def _is_untrac_run(run) -> bool:
    return any(k.startswith(TAG_PREFIX) for k in run.data.tags)


def _experiments(client: MlflowClient, name: str | None, uri: str) -> dict[str, str]:
    """Experiment id -> name: the one named, or every active experiment of the store."""
    try:
        if name is not None:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                names = sorted(e.name for e in client.search_experiments())
                raise TrackingError(f"no experiment {name!r} in {uri} (experiments: "
                                    f"{', '.join(names) or 'none'})")
            return {exp.experiment_id: exp.name}
        return {e.experiment_id: e.name for e in client.search_experiments()}
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001
        raise TrackingError(f"cannot read MLflow store {uri}: {err}") from None


def _store_exists(uri: str) -> bool:
    """False for a SQLite file that is not there; a server that does not answer within
    seconds is a TrackingError here (not minutes of MLflow's retries)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    check_store(uri)
    return True


def list_runs(
    tracking_uri: str, experiment: str | None = None, filter_string: str | None = None,
    limit: int = 50,
) -> list[RunRecord]:
    """untrac-ray runs of the store (one experiment, or all), newest first, at most `limit`.

    `filter_string` is an MLflow search filter, e.g. "tags.`untrac_ray.job` = 'tiny'".
    """
    if not _store_exists(tracking_uri):
        raise TrackingError(f"no MLflow store at {tracking_uri} (run a job first, or pass "
                            "--tracking-uri)")
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = _experiments(client, experiment, tracking_uri)
    if not experiments:
        return []
    out: list[RunRecord] = []
    token = None
    while len(out) < limit:
        try:
            page = client.search_runs(
                list(experiments), filter_string or "", order_by=["attributes.start_time DESC"],
                max_results=max(100, limit), page_token=token,
            )
        except Exception as err:  # noqa: BLE001
            raise TrackingError(f"cannot search runs (filter {filter_string!r}): "
                                f"{str(err).splitlines()[0]}") from None
        out += [_record(r, experiments) for r in page if _is_untrac_run(r)]
        token = page.token
        if not token:
            break
    return out[:limit]


def resolve_run_id(run: str, tracking_uri: str) -> str:
    """A run's full id from its id, a unique prefix of it, or its run name."""
    if not _store_exists(tracking_uri):
        raise TrackingError(f"no MLflow store at {tracking_uri} (run a job first, or pass "
                            "--tracking-uri)")
    client = MlflowClient(tracking_uri=tracking_uri)
    if RUN_ID_PATTERN.match(run):
        try:
            return client.get_run(run).info.run_id
        except Exception:  # noqa: BLE001
            raise TrackingError(f"no run {run} in {tracking_uri}") from None
    experiments = _experiments(client, None, tracking_uri)
    matches: list[str] = []
    if experiments and re.fullmatch(r"[0-9a-f]{1,31}", run):
        try:
            found = client.search_runs(list(experiments), f"attributes.run_id LIKE '{run}%'",
                                       max_results=10)
            matches = [r.info.run_id for r in found]
        except Exception:  # noqa: BLE001  (a store without LIKE on run ids)
            matches = []
    if not matches and experiments and "'" not in run:
        found = client.search_runs(list(experiments), f"attributes.run_name = '{run}'",
                                   max_results=10)
        matches = [r.info.run_id for r in found]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise TrackingError(f"run {run!r} is ambiguous in {tracking_uri}: it matches "
                            f"{', '.join(matches)}")
    raise TrackingError(f"no run {run!r} in {tracking_uri} (give a run id, a unique prefix of "
                        "one, or a run name; `untrac-ray runs` lists them)")


def get_run_record(run: str, tracking_uri: str) -> RunRecord:
    """One run's record; `run` is an id, a unique id prefix or a run name."""
    run_id = resolve_run_id(run, tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_run(run_id)
    exp = client.get_experiment(found.info.experiment_id)
    return _record(found, {exp.experiment_id: exp.name})


def list_run_artifacts(run_id: str, tracking_uri: str, folder: str | None = None) -> list[str]:
    """Paths of a run's artifacts in a folder (not recursive; [] if the folder is absent)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    return [a.path for a in client.list_artifacts(run_id, folder)]


def read_run_table(run_id: str, tracking_uri: str, stem: str) -> pd.DataFrame | None:
    """A table a run logged with log_table (stem e.g. "scores", "examples/top_examples"),
    or None when the run has none."""
    folder = os.path.dirname(stem) or None
    if f"{stem}.parquet" not in list_run_artifacts(run_id, tracking_uri, folder):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{stem}.parquet", dst_path=tmp,
            tracking_uri=tracking_uri,
        )
        table = pd.read_parquet(path)
    if {"method", "step"} <= set(table.columns):  # influence and score tables of older runs
        table = with_points(table)
    return table


def local_artifact_root(tracking_uri: str) -> str | None:
    """Where runs of a SQLite store keep their artifacts (a file:// URI), else None."""
    return _artifact_root(tracking_uri)


def ui_command(tracking_uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The `mlflow ui` command serving a store (one worker: a local, single-user UI)."""
    import sys

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    root = _artifact_root(tracking_uri)
    if root is not None:  # experiments created from the UI keep artifacts beside the store
        cmd += ["--default-artifact-root", root]
    return cmd


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose database file does not exist (yet)."""
    return _store_exists(tracking_uri)


# --- Searches (`untrac-ray tune`): a parent run per search, one nested child run per trial ---

PARENT_TAG = "mlflow.parentRunId"


class SearchRun(JobRun):
    """The parent run of a hyperparameter search (space, objective, best trial, figures).

    With `run_id` it re-opens that run (a resumed search) instead of creating one. Each trial
    gets a nested child run from `child`; only the driver writes (SQLite dislikes concurrent
    writers).
    """

    def __init__(self, spec: JobSpec, tracking_uri: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, name: str | None = None) -> None:
        super().__init__(spec, tracking_uri, {TAG_PREFIX + "kind": "search", **(tags or {})},
                         run_id=run_id)
        self.name = name
        self.experiment_id = ""
        self.interrupted = False  # set when trials are left to resume: the run ends KILLED

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.interrupted and self.client is not None:
            if self._beat is not None:
                self._beat.set()
            self.client.set_terminated(self.run_id, "KILLED")
            return
        super().__exit__(exc_type, exc, tb)

    def __enter__(self) -> SearchRun:
        super().__enter__()
        if not self.resumed and self.name:  # the run is named after the search (Tune's)
            self.client.set_tag(self.run_id, "mlflow.runName", self.name)
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return self

    def child(self, trial_id: str, name: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> JobRun:
        """A new nested run for one trial (status RUNNING until `end_child`)."""
        run_tags = {
            PARENT_TAG: self.run_id,
            TAG_PREFIX + "job": self.spec.name,
            TAG_PREFIX + "kind": "trial",
            TAG_PREFIX + "trial_id": trial_id,
            TAG_PREFIX + "model": self.spec.model.path or self.spec.model.config["model_type"],
            TAG_PREFIX + "n_train": str(len(self.spec.data.train)),
            TAG_PREFIX + "n_test": str(len(self.spec.data.test)),
            **{TAG_PREFIX + k: v for k, v in (tags or {}).items()},
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        handle = JobRun(self.spec, self.uri)
        handle.client, handle.run_id = self.client, run.info.run_id
        flat = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(handle.run_id, params=flat[i : i + 100])
        return handle

    def attach(self, run_id: str) -> JobRun:
        """A handle on an existing child run."""
        handle = JobRun(self.spec, self.uri)
        handle.client, handle.run_id = self.client, run_id
        return handle

    def end_child(self, child: JobRun, status: str = "FINISHED", error: str | None = None,
                  tags: dict[str, str] | None = None) -> None:
        """Close a trial's run: FINISHED, FAILED (with the error as a tag) or KILLED."""
        for key, value in (tags or {}).items():
            child.set_tag(key, value)
        if error:
            child.set_tag("error", error[:5000])
        self.client.set_terminated(child.run_id, status)

    def children(self) -> dict[str, tuple[str, str]]:
        """The live child runs by trial id: (run id, status)."""
        return {t: (r["run_id"], r["status"]) for t, r in self.child_records().items()}

    def child_records(self) -> dict[str, dict[str, Any]]:
        """The live child runs by trial id: run id, status, params, metrics and tags."""
        found: dict[str, dict[str, Any]] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.run_id}'",
                max_results=1000, page_token=token, order_by=["attributes.start_time ASC"],
            )
            for r in page:
                trial = r.data.tags.get(TAG_PREFIX + "trial_id")
                if trial:
                    found[trial] = {"run_id": r.info.run_id, "status": r.info.status,
                                    "params": dict(r.data.params),
                                    "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}
            token = page.token
            if not token:
                return found

    def delete_child(self, run_id: str) -> None:
        """Drop a trial's run that will be redone (a trial cut off by a killed driver)."""
        self.client.delete_run(run_id)


def read_run_text(run_id: str, tracking_uri: str, artifact_file: str) -> str | None:
    """A text artifact of a run (e.g. best_job.yaml), or None when the run has none."""
    folder = os.path.dirname(artifact_file) or None
    if artifact_file not in list_run_artifacts(run_id, tracking_uri, folder):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_file, dst_path=tmp, tracking_uri=tracking_uri,
        )
        return Path(path).read_text()
