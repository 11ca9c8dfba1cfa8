"""The MLflow tracking store: which one (the URI), whether it can be used (a quick check
before any work, and the lock under which a new SQLite store gets its schema), the client that
redacts every text it writes, and the names of the tags runs carry, which writing (tracking.py)
and reading (runs.py) share.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from untrac_ray.inputs.errors import TrackingError
from untrac_ray.inputs.redaction import learn, redact
from untrac_ray.inputs.spec import JobSpec

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_PREFIX = "untrac_ray."
HEADLINE_TAG = "headline_pearson"  # method=mean Pearson at the point fixed in advance
TASKS = "tasks"  # the artifact folder of a run's finished tasks (task_store.py)

HEARTBEAT_TAG = "heartbeat"  # unix seconds, refreshed by a live driver
HEARTBEAT_S = float(os.environ.get("UNTRAC_RAY_HEARTBEAT_S", "30"))
STALE_AFTER = 3  # heartbeats missed before a RUNNING run counts as stale
OWNER_TAG = "owner"  # the generation of the driver that writes the run (tracking.JobRun)


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


def artifact_root(uri: str) -> str | None:
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

    An existing SQLite file is opened under the store's lock (see prepare_store): a schema a
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
        text = str(err)
        reason = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        if "refused" in text.lower():  # nothing listens there: say where, and what to start
            where = urlsplit(uri)
            port = where.port or (443 if where.scheme == "https" else 80)
            raise TrackingError(
                f"tracking store {uri}: connection refused at {where.hostname}:{port}; start "
                f"an MLflow server there (mlflow server --host {where.hostname} --port "
                f"{port}) or log to a local store (--tracking-uri sqlite:///mlflow.db)"
            ) from None
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


def prepare_store(uri: str) -> None:
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


def get_or_create_experiment(client: MlflowClient, name: str,
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


def store_exists(uri: str) -> bool:
    """False for a SQLite file that is not there; a server that does not answer within
    seconds is a TrackingError here (not minutes of MLflow's retries)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    check_store(uri)
    return True
