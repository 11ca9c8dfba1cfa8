"""Writing a run to MLflow: one run per job (`JobRun`) with params, metrics, tables, figures,
the spec and its finished tasks; a search's parent run with a nested run per trial
(`SearchRun`). Only the driver writes (SQLite does not like concurrent writers); actors return
results to it. The store itself is store.py; reading runs back is runs.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from untrac_ray.inputs.errors import RunAdopted, TrackingError
from untrac_ray.inputs.hub import model_commit
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.results.scores import ARTIFACT as SCORE_TABLE
from untrac_ray.results.store import (
    HEADLINE_TAG,
    HEARTBEAT_S,
    HEARTBEAT_TAG,
    OWNER_TAG,
    TAG_PREFIX,
    TASKS,
    RedactingClient,
    artifact_root,
    get_or_create_experiment,
    prepare_store,
)


def metric_key(*parts: str) -> str:
    """A metric name from parts, with characters MLflow refuses replaced by '_'."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", p) for p in parts)


def model_tags(spec: JobSpec) -> dict[str, str]:
    """The tags naming a run's model: its folder, Hub id or model type, and a Hub model's
    commit (the one the job pinned; its revision may be a branch)."""
    tags = {TAG_PREFIX + "model": spec.model.path or spec.model.config["model_type"]}
    commit = model_commit(spec.model)
    if commit is not None:
        tags[TAG_PREFIX + "model_commit"] = commit
    return tags


def spec_params(spec: JobSpec) -> dict[str, str]:
    """A run's params: the spec's settings as dotted keys, and `model.commit` for a Hub
    model."""
    params = flatten(spec.model_dump(mode="json"))
    commit = model_commit(spec.model)
    if commit is not None:
        params["model.commit"] = commit
    return params


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


class JobRun:
    """An MLflow run for one job. FINISHED only when the `with` block ends without error.

    With `run_id` it continues that run (`--resume`): status back to RUNNING, no new params.
    While open, a thread refreshes the heartbeat tag so that a run whose driver was killed
    (SIGKILL, a lost node) is recognisable as stale, and adoptable by `--resume`. The run
    also keeps the job's finished tasks (task_store.Remote: artifacts under tasks/).

    Each driver that opens the run tags it as its owner (a new generation each time): a
    driver whose heartbeats failed long enough for another to adopt its run finds another
    owner before its next write and stops with one line (RunAdopted), leaving the run to its
    new owner. The run is created with its driver, heartbeat and owner tags at once, so a
    store that fails right after still leaves a run that shows stale and can be resumed; a
    failure while opening closes the run FAILED. `start_time` (ms since the epoch) is when the
    job began, so that a new run's duration covers the set-up before it (the data stage).
    """

    def __init__(self, spec: JobSpec, tracking_uri: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, start_time: int | None = None):
        self.spec = spec
        self.start_time = start_time
        self.uri = tracking_uri
        self.extra_tags = tags or {}
        self.client: MlflowClient | None = None
        self.run_id = ""
        self.resume_id = run_id
        self.resumed = False
        self.owner: str | None = None  # this driver's generation; None: a handle, no check
        self.adopted = False  # another driver owns the run now: write nothing more
        self._beat: threading.Event | None = None

    def __enter__(self) -> JobRun:
        prepare_store(self.uri)
        self.owner = uuid.uuid4().hex
        try:
            if self.resume_id is not None:
                self._reopen(self.resume_id)
            else:
                self._create()
            self._start_heartbeat()
        except BaseException as err:
            self._close_after_failed_start(err)
            raise
        return self

    def _driver_tags(self) -> dict[str, str]:
        """Who writes the run: host and pid, heartbeat, its period and this generation."""
        return {TAG_PREFIX + "driver": f"{socket.gethostname()}:{os.getpid()}",
                TAG_PREFIX + "heartbeat_s": f"{HEARTBEAT_S:g}",
                TAG_PREFIX + HEARTBEAT_TAG: f"{time.time():.0f}",
                TAG_PREFIX + OWNER_TAG: self.owner}

    def _create(self) -> None:
        try:
            self.client = RedactingClient(tracking_uri=self.uri)
            exp_id = get_or_create_experiment(self.client, self.spec.tracking.experiment,
                                              artifact_root(self.uri))
        except Exception as err:  # noqa: BLE001
            raise TrackingError(f"cannot use MLflow store {self.uri}: {err}") from None
        tags = {
            TAG_PREFIX + "job": self.spec.name,
            TAG_PREFIX + "methods": ",".join(self.spec.methods.enabled()),
            **model_tags(self.spec),
            TAG_PREFIX + "n_train": str(len(self.spec.data.train)),
            TAG_PREFIX + "n_test": str(len(self.spec.data.test)),
            **self._driver_tags(),
            **self.extra_tags,
        }
        run = self.client.create_run(
            exp_id, run_name=f"{self.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags,
            start_time=self.start_time,
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in spec_params(self.spec).items()]
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
        for key, value in self._driver_tags().items():  # the owner first: this run is ours
            self.client.set_tag(run_id, key, value)
        self.run_id = run_id
        self.resumed = True
        self.client.update_run(run_id, status="RUNNING")
        for key, value in self.extra_tags.items():
            self.client.set_tag(run_id, key, value)
        if TAG_PREFIX + "error" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, TAG_PREFIX + "error")  # the last try's error

    def _close_after_failed_start(self, err: BaseException) -> None:
        """A run created or reopened, then a failure before it was ready: close it FAILED
        (KILLED for an interrupt) as the job would have; the store may refuse that too."""
        if self._beat is not None:
            self._beat.set()
        if self.client is None or not self.run_id:
            return
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, TAG_PREFIX + "error", str(err)[:5000])
        with contextlib.suppress(Exception):
            self.client.set_terminated(self.run_id, status)

    def _start_heartbeat(self) -> None:
        """Refresh the heartbeat from a daemon thread, while this driver owns the run."""
        stop = self._beat = threading.Event()
        client, run_id = RedactingClient(tracking_uri=self.uri), self.run_id

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(Exception):  # a store that hiccups: try next time
                    if not self._owns(client):
                        return
                    client.set_tag(run_id, TAG_PREFIX + HEARTBEAT_TAG, f"{time.time():.0f}")

        threading.Thread(target=beat, name="untrac-ray-heartbeat", daemon=True).start()

    def _owns(self, client: MlflowClient | None = None) -> bool:
        """Whether this driver still owns the run (True for a handle without an owner)."""
        if self.owner is None:
            return True
        if not self.adopted:
            tags = (client or self.client).get_run(self.run_id).data.tags
            self.adopted = tags.get(TAG_PREFIX + OWNER_TAG, self.owner) != self.owner
        return not self.adopted

    def _check_owner(self) -> None:
        """Before a write: RunAdopted (one line) if another driver owns the run now."""
        if not self._owns():
            raise RunAdopted(f"run {self.run_id} was taken over by another driver (`--resume` "
                             "found this one silent); this driver stops and leaves the run "
                             "to it")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._beat is not None:
            self._beat.set()
        if self.client is None or not self.run_id:
            return
        with contextlib.suppress(Exception):  # an unreachable store: the status says nothing
            if not self._owns():
                return  # the new owner closes it
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
        self._check_owner()
        self.client.log_artifact(self.run_id, str(path), TASKS)

    def set_tag(self, key: str, value: str) -> None:
        self._check_owner()
        self.client.set_tag(self.run_id, TAG_PREFIX + key, value)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Log many metrics in one call."""
        self._check_owner()
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self._log_batch(metrics)

    def _log_batch(self, metrics: list[Metric]) -> None:
        """Metrics in batches of 1000 (MLflow's limit)."""
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_base_losses(self, losses: dict[str, float]) -> None:
        self.log_metrics({metric_key("base_loss", name): v for name, v in losses.items()})

    def log_cells(self, rows: list[dict]) -> None:
        """Every cell's influence, keyed influence/<method>/<train>/<test>, at its evaluation
        point (the MLflow step: trajectories of sets of any size line up by point)."""
        self._check_owner()
        now = int(time.time() * 1000)
        metrics = [
            Metric(metric_key("influence", r["method"], r["train_set"], r["test_set"]),
                   float(r["influence"]), now, int(r["point"]))
            for r in rows
        ]
        self._log_batch(metrics)

    def log_score_table(self, scores: pd.DataFrame) -> None:
        """The one score table (results/scores.py): its rows as metrics (score_views.
        metric_points: every point as the step, the headline's value, interval and margin),
        the table itself (`score_table`), and the headline tag (each estimate's mean Pearson
        at its point fixed in advance, what `runs` lists)."""
        from untrac_ray.results.score_views import headline_values, metric_points

        now = int(time.time() * 1000)
        self._log_batch([Metric(metric_key("score", method, name), value, now, step)
                         for method, name, value, step in metric_points(scores)])
        self.log_table(scores, SCORE_TABLE)
        headline = ",".join(f"{m}={v:.3f}" for m, v in headline_values(scores, "pearson")
                            .items())
        if headline:
            self.set_tag(HEADLINE_TAG, headline)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._check_owner()
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, table: pd.DataFrame, stem: str) -> None:
        """A table as Parquet and CSV artifacts (stem may hold a folder: examples/top)."""
        self._check_owner()
        folder, name = os.path.split(stem)
        with tempfile.TemporaryDirectory() as tmp:
            for suffix, write in ((".parquet", table.to_parquet), (".csv", table.to_csv)):
                path = Path(tmp, name + suffix)
                write(path, index=False)
                self.client.log_artifact(self.run_id, str(path), folder or None)

    def log_figure(self, fig, artifact_file: str) -> None:
        self._check_owner()
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, fig, artifact_file)
        plt.close(fig)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True), artifact_file)

# --- Searches (`untrac-ray tune`): a parent run per search, one nested child run per trial ---

PARENT_TAG = "mlflow.parentRunId"


class SearchRun(JobRun):
    """The parent run of a hyperparameter search (space, objective, best trial, figures).

    With `run_id` it re-opens that run (a resumed search) instead of creating one. Each trial
    gets a nested child run from `child`; only the driver writes (SQLite dislikes concurrent
    writers).
    """

    def __init__(self, spec: JobSpec, tracking_uri: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, name: str | None = None,
                 start_time: int | None = None) -> None:
        super().__init__(spec, tracking_uri, {TAG_PREFIX + "kind": "search", **(tags or {})},
                         run_id=run_id, start_time=start_time)
        self.name = name
        self.experiment_id = ""
        self.interrupted = False  # set when trials are left to resume: the run ends KILLED

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.interrupted and self.client is not None:
            if self._beat is not None:
                self._beat.set()
            if self._owns():
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
            **model_tags(self.spec),
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
