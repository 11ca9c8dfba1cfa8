"""Reading runs back from MLflow: a run's influence table and other tables, the records that
`runs`, `show`, `compare` and `ui` show (browse.py computes what they print), the run that
`--resume` continues, and the `mlflow ui` command.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from untrac_ray.inputs.errors import TrackingError
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.results.store import (
    HEADLINE_TAG,
    HEARTBEAT_S,
    HEARTBEAT_TAG,
    STALE_AFTER,
    TAG_PREFIX,
    artifact_root,
    store_exists,
)
from untrac_ray.results.tables import with_points


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
                       kind: str | None = None, parent: str | None = None) -> RunRecord:
    """The newest unfinished run of this job (same name and spec hash) that `--resume` can
    continue: KILLED, FAILED, or RUNNING with its driver gone; a top-level run, or one nested
    under `parent` (a calibration's). TrackingError (one line) when there is none, saying why
    (nothing unfinished, a live driver, a changed spec)."""
    if not store_exists(tracking_uri):
        raise TrackingError(f"nothing to resume: no MLflow store at {tracking_uri}")
    job = spec.name.replace("'", "")
    records = [r for r in list_runs(tracking_uri, None, f"tags.`{TAG_PREFIX}job` = '{job}'",
                                    limit=200)
               if r.tags.get(TAG_PREFIX + "kind") == kind and r.parent_id == parent]
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


def list_runs(
    tracking_uri: str, experiment: str | None = None, filter_string: str | None = None,
    limit: int = 50,
) -> list[RunRecord]:
    """untrac-ray runs of the store (one experiment, or all), newest first, at most `limit`.

    `filter_string` is an MLflow search filter, e.g. "tags.`untrac_ray.job` = 'tiny'".
    """
    if not store_exists(tracking_uri):
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
    if not store_exists(tracking_uri):
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


def ui_command(tracking_uri: str, port: int, host: str = "127.0.0.1"
               ) -> tuple[list[str], dict[str, str]]:
    """The `mlflow ui` command serving a store (one worker: a local, single-user UI), and the
    environment variables that name the store: never on the command line, where `ps` and
    every process of the machine would show a database password."""
    import sys

    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port),
           "--workers", "1"]
    env = {"MLFLOW_BACKEND_STORE_URI": tracking_uri}
    root = artifact_root(tracking_uri)
    if root is not None:  # experiments created from the UI keep artifacts beside the store
        env["MLFLOW_DEFAULT_ARTIFACT_ROOT"] = root
    return cmd, env


def artifact_folder(run_id: str, tracking_uri: str) -> str:
    """Where a run's artifacts are: an absolute local folder for a store that keeps them on
    this machine (SQLite's mlartifacts/ beside the database), else the artifact URI."""
    from urllib.parse import unquote, urlparse

    uri = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.artifact_uri
    if uri.startswith("file:"):
        return str(Path(unquote(urlparse(uri).path)).resolve())
    return uri


def read_run_bytes(run_id: str, tracking_uri: str, artifact_file: str) -> bytes | None:
    """An artifact of a run as bytes (a figure, say), or None when the run has none."""
    folder = os.path.dirname(artifact_file) or None
    if artifact_file not in list_run_artifacts(run_id, tracking_uri, folder):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_file, dst_path=tmp, tracking_uri=tracking_uri,
        )
        return Path(path).read_bytes()


def read_run_text(run_id: str, tracking_uri: str, artifact_file: str) -> str | None:
    """A text artifact of a run (e.g. best_job.yaml), or None when the run has none."""
    data = read_run_bytes(run_id, tracking_uri, artifact_file)
    return None if data is None else data.decode()
