"""Finished tasks kept as they complete, so that a job whose driver died resumes (`--resume`).

The pattern is kronfluence's factor and score computers: each unit of work is saved under a
key that names what produced it, skipped when already present, and merged when all exist.

- `task_key(task, job_key)`: the task's kind, a readable name and a hash of every setting that
  decides its result (the task's own fields, plus the job's data, model and evaluation
  settings, which `job_key` stands for).
- `encode` / `decode`: a TaskResult as one `.npz` file (no pickle: numbers, arrays and a JSON
  header), checked against the expected key when read back.
- `TaskStore`: a run's finished tasks. A result is written first to a local spool file under
  the cache dir, then uploaded to the run (an MLflow artifact `tasks/<key>.npz`, through the
  `Remote` the tracking layer gives); the spool file goes once the upload worked. If the
  store is unreachable, results stay in the spool and are uploaded when the job ends or
  resumes. Nothing here knows MLflow or Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from untrac_ray.inputs.errors import RunAdopted
from untrac_ray.inputs.fingerprints import spec_hash
from untrac_ray.methods.tasks import KEYED_WHEN_SET, TaskResult

FOLDER = "tasks"  # the artifact folder of a run that holds its finished tasks
SUFFIX = ".npz"


def _plain(value: Any) -> Any:
    """A task field as JSON-able data (pydantic settings dumped, tuples as lists)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def task_settings(task: Any) -> dict[str, Any]:
    """Every field of a task (a frozen dataclass), with its kind: what decides its result. A
    field marked KEYED_WHEN_SET (added after results were stored) counts only when it is not
    its default, so the keys of tasks stored before it existed stay the same."""
    fields = {f.name: _plain(getattr(task, f.name)) for f in dataclasses.fields(task)
              if not (f.metadata.get(KEYED_WHEN_SET) and getattr(task, f.name) == f.default)}
    return {"kind": type(task).__name__, **fields}


def _label(task: Any) -> str:
    """A readable part of a key: the task's kind and what it works on."""
    parts = [type(task).__name__.removesuffix("Task").lower()]
    for name in ("method", "forget", "left_out", "subset", "seed", "weights", "dataset",
                 "datasets"):
        value = getattr(task, name, None)
        if name == "left_out" and hasattr(task, "left_out"):
            value = value or "all"
        if value is not None:
            parts.append("+".join(value) if isinstance(value, tuple) else str(value))
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "-".join(parts))[:80]


def task_key(task: Any, job_key: str) -> str:
    """The key a task's result is stored under (changes with any setting of the task or job)."""
    return f"{_label(task)}-{spec_hash(task_settings(task), job_key)}"


def encode(result: TaskResult, key: str) -> bytes:
    """A finished task's result as the bytes of one .npz file."""
    arrays: dict[str, np.ndarray] = {}
    payload_kind = None
    payload = result.payload
    if isinstance(payload, np.ndarray):
        payload_kind, arrays["payload"] = "array", payload
    elif isinstance(payload, dict) and all(isinstance(k, str) for k in payload):
        payload_kind = "named"  # named numbers, such as a stopped run's {"stopped_at": step}
        arrays["payload"] = np.array([v for v in payload.values()], dtype=np.float64)
    elif isinstance(payload, dict):  # EK-FAC scores, dot products: (name, name) -> number
        payload_kind = "pairs"
        arrays["payload"] = np.array([v for v in payload.values()], dtype=np.float64)
    elif payload is not None:
        raise TypeError(f"cannot store a task payload of type {type(payload).__name__}")
    meta = {
        "key": key,
        "losses": {str(step): losses for step, losses in result.losses.items()},
        "seconds": result.seconds,
        "worker": result.worker,
        "payload": payload_kind,
        "pairs": ([list(k) for k in payload] if payload_kind == "pairs"
                  else list(payload) if payload_kind == "named" else None),
        "rows": sorted(result.row_losses) if result.row_losses is not None else None,
    }
    for name, values in (result.row_losses or {}).items():
        arrays[f"row/{name}"] = np.asarray(values)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class StoredResultError(ValueError):
    """A stored file that is not the result of the task expected (damaged or renamed)."""


def decode(data: bytes, task: Any, key: str) -> TaskResult:
    """The TaskResult stored in `data` for `task`; StoredResultError unless it is that task's."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode())
            rows = ({name: npz[f"row/{name}"] for name in meta["rows"]}
                    if meta["rows"] is not None else None)
            payload = npz["payload"] if meta["payload"] else None
    except Exception as err:  # noqa: BLE001 - truncated, not an npz, missing fields
        raise StoredResultError(f"unreadable ({type(err).__name__}: {err})") from None
    if meta.get("key") != key:
        raise StoredResultError(f"made by other settings (key {meta.get('key')})")
    if meta["payload"] == "pairs":
        payload = {tuple(k): float(v) for k, v in zip(meta["pairs"], payload, strict=True)}
    elif meta["payload"] == "named":
        payload = {k: float(v) for k, v in zip(meta["pairs"], payload, strict=True)}
    losses = {int(step): {n: float(v) for n, v in values.items()}
              for step, values in meta["losses"].items()}
    return TaskResult(task=task, losses=losses, seconds=float(meta["seconds"]),
                      worker=meta["worker"], row_losses=rows, payload=payload)


class Remote(Protocol):
    """Where a run keeps its finished tasks for good (tracking.JobRun: MLflow artifacts)."""

    def stored_task_keys(self) -> set[str]:
        """The keys of the tasks stored so far."""

    def read_task(self, key: str) -> bytes:
        """The bytes of one stored task."""

    def store_task(self, path: Path) -> None:
        """Store one task's file (named <key>.npz); raise if the store cannot take it."""


class TaskStore:
    """The finished tasks of one run: restored on resume, saved as each one completes."""

    def __init__(self, remote: Remote, spool: Path, job_key: str) -> None:
        self.remote = remote
        self.spool = Path(spool)
        self.job_key = job_key
        self.upload_error: str | None = None  # the last failed upload (results kept locally)

    def key(self, task: Any) -> str:
        return task_key(task, self.job_key)

    def restore(self, tasks: Sequence[Any]) -> dict[int, TaskResult]:
        """The stored results of these tasks, by position (results made by other settings,
        or damaged files, are not restored: those tasks run again)."""
        try:
            remote_keys = self.remote.stored_task_keys()
        except Exception as err:  # noqa: BLE001 - the store is down: the spool still counts
            self.upload_error = _first_line(err)
            remote_keys = set()
        out: dict[int, TaskResult] = {}
        for index, task in enumerate(tasks):
            key = self.key(task)
            local = self._spooled(key)
            sources = [("spool", local.read_bytes)] if local.is_file() else []
            if key in remote_keys:
                sources.append(("run", lambda key=key: self.remote.read_task(key)))
            for where, read in sources:
                try:
                    result = decode(read(), task, key)
                except StoredResultError:  # damaged or foreign: never restored
                    if where == "spool":
                        local.unlink(missing_ok=True)
                    continue
                result.index = index
                out[index] = result
                break
        return out

    def save(self, result: TaskResult) -> bool:
        """Keep one finished task: in the spool at once, then in the run. False when the
        upload failed (the result stays in the spool until `flush`)."""
        key = self.key(result.task)
        path = self._spooled(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(encode(result, key))
        os.replace(partial, path)  # a killed driver leaves no half-written result
        return self._upload(path)

    def pending(self) -> list[Path]:
        """Results kept locally that the run does not hold yet."""
        return sorted(self.spool.glob(f"*{SUFFIX}")) if self.spool.is_dir() else []

    def flush(self) -> int:
        """Upload every result left in the spool; returns how many are still only local."""
        return sum(not self._upload(path) for path in self.pending())

    def _upload(self, path: Path) -> bool:
        try:
            self.remote.store_task(path)
        except RunAdopted:  # another driver writes the run now: stop, not spool
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the store: keep it locally
            self.upload_error = _first_line(err)
            return False
        path.unlink(missing_ok=True)
        return True

    def _spooled(self, key: str) -> Path:
        return self.spool / f"{key}{SUFFIX}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
