"""MLflow, and only here: one run per job with params, metrics, tables, figures and the spec.

Only the driver writes (SQLite does not like concurrent writers); actors return results to it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from untrac_ray.errors import TrackingError
from untrac_ray.spec import JobSpec

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_PREFIX = "untrac_ray."


def resolve_tracking_uri(cli_uri: str | None, spec: JobSpec | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the spec's tracking.uri, else SQLite."""
    return (
        cli_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (spec.tracking.uri if spec is not None else None)
        or DEFAULT_TRACKING_URI
    )


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


def _prepare_store(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).resolve().parent.mkdir(parents=True, exist_ok=True)


class JobRun:
    """An MLflow run for one job. FINISHED only when the `with` block ends without error."""

    def __init__(self, spec: JobSpec, tracking_uri: str, tags: dict[str, str] | None = None):
        self.spec = spec
        self.uri = tracking_uri
        self.extra_tags = tags or {}
        self.client: MlflowClient | None = None
        self.run_id = ""

    def __enter__(self) -> JobRun:
        _prepare_store(self.uri)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.spec.tracking.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                self.spec.tracking.experiment, artifact_location=_artifact_root(self.uri)
            )
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
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
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
        """Every cell's influence, keyed influence/<method>/<train>/<test>, at its step."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(metric_key("influence", r["method"], r["train_set"], r["test_set"]),
                   float(r["influence"]), now, int(r["step"]))
            for r in rows
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_scores(self, scores: pd.DataFrame, summary: pd.DataFrame) -> None:
        """Correlations with the ground truth: metrics per step, tables, best-score tag."""
        now = int(time.time() * 1000)
        metrics = []
        for r in scores.itertuples():
            name = {"__mean__": "mean", "__all__": "all"}.get(r.test_set, r.test_set)
            for stat in ("pearson", "spearman"):
                value = getattr(r, stat)
                if value == value:  # not NaN
                    metrics.append(Metric(metric_key("score", r.method, f"{stat}_{name}"),
                                          float(value), now, int(r.step)))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        self.log_table(scores, "scores")
        self.log_table(summary, "score_summary")
        best = ",".join(f"{r.method}={r.pearson_mean:.3f}" for r in summary.itertuples())
        self.set_tag("best_pearson", best)

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
        return pd.read_parquet(path)
