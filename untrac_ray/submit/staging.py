"""Staging a job for a Ray cluster: the job file and the local files it names copied into a
small folder (the job's `working_dir`, uploaded by Ray), and the request that starts
`python -m untrac_ray.cli run job.yaml --address auto --tracking-uri URI` there.

Paths on a filesystem the nodes share (`shared` prefixes) and remote URIs (s3://, gs://,
hdfs://) are passed as they are, but for their secrets: a password or token in a URI (the
tracking URI's, a data source's) travels as an environment variable of the job, never in the
entrypoint or a staged file (see `job_request`). Nothing here prints or parses arguments;
errors are UntracError subclasses with one-line messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from untrac_ray.inputs.errors import InputError
from untrac_ray.inputs.hub import model_commit
from untrac_ray.inputs.loading import absolute_sqlite_uri, load_spec
from untrac_ray.inputs.redaction import has_secret, redact, split_credentials, to_placeholders
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import DatasetSpec, is_uri

UPLOAD_LIMIT_BYTES = 100 * 2**20  # a working_dir above ~100 MiB fails in practice
SUBMISSION_ENV = "UNTRAC_RAY_SUBMISSION_ID"  # set in the job's runtime env
SUBMISSION_TAG = "untrac_ray.ray_submission_id"  # the MLflow tag holding it
META_JOB = "untrac_ray.job"  # metadata key that marks an untrac-ray job (value: job name)
META_TRACKING = "untrac_ray.tracking_uri"
META_SPEC = "untrac_ray.spec"
STAGED_SPEC = "job.yaml"


class UploadError(InputError):
    """A file the job names cannot travel with it (missing, or above the upload limit)."""

# ---------------------------------------------------------------- staging a job


@dataclass
class StagedJob:
    """A folder holding the job file and the local files it names, ready for upload."""

    folder: Path
    job_file: Path
    spec: JobSpec
    uploaded: dict[str, str]  # local path -> path inside the folder
    passed: list[str]  # shared paths (as the cluster sees them) and URIs
    size: int
    # the secret parts of the spec's URIs, by the ${NAME} standing for them in the staged
    # job file: they travel as environment variables of the job, never in a file
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _parts(node: Any) -> Iterator[Any]:
    """Every pydantic model inside a spec, the spec included (depth first)."""
    if hasattr(type(node), "model_fields"):
        yield node
        for name in type(node).model_fields:
            yield from _parts(getattr(node, name))
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _parts(item)


def _datasets(node: Any) -> Iterator[DatasetSpec]:
    """Every DatasetSpec anywhere in a spec (train, test, and any other list of datasets)."""
    return (p for p in _parts(node) if isinstance(p, DatasetSpec))


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def shared_prefixes(shared: list[str] | tuple[str, ...]) -> list[tuple[Path, str]]:
    """--shared values as (local prefix, cluster prefix): `PATH` is the same path on both
    sides, `LOCAL=CLUSTER` maps a local folder to where the nodes see the same files."""
    out = []
    for item in shared:
        local, sep, remote = item.partition("=")
        prefix = Path(local).expanduser().resolve()
        out.append((prefix, remote if sep else str(prefix)))
    return out


def on_cluster(path: str, shared: list[tuple[Path, str]]) -> str | None:
    """Where the cluster finds a local path under a shared prefix (None: not shared)."""
    p = Path(path)
    for local, remote in shared:
        if p == local or local in p.parents:
            rel = p.relative_to(local).as_posix()
            return remote if rel == "." else f"{remote.rstrip('/')}/{rel}"
    return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def stage_job(
    job_file: str | Path,
    shared: list[str] | tuple[str, ...] = (),
    limit: int = UPLOAD_LIMIT_BYTES,
    extra_bytes: int = 0,
    overrides: Sequence[str] = (),
) -> StagedJob:
    """Validate a job file and stage it with the local files it names.

    Local data files, the model and tokenizer folders are copied (keeping their file names, so
    content fingerprints do not change); URIs are kept, and paths under a `shared` prefix
    (see `shared_prefixes`) become the cluster's paths, without being read here. A Hub model
    is not copied: its revision is pinned to the commit it names here (model.revision: the
    40-hex sha), so the head loads that commit, and HF_TOKEN, if set, travels as a secret.
    Raises SpecError for a bad spec, UploadError for a missing file or one that would take
    the upload above `limit` bytes (with `extra_bytes` already used, e.g. by the package).
    """
    spec = load_spec(job_file, overrides)  # --set: the staged job file has them applied
    mapping = shared_prefixes(shared)
    wanted: dict[str, str] = {}  # local path -> key naming it in the spec
    for ds in _datasets(spec):
        wanted.setdefault(ds.source, f"dataset {ds.name!r}")
    commit = model_commit(spec.model)  # a Hub id: resolved here, pinned in the staged spec
    if spec.model.path and commit is None:
        wanted.setdefault(spec.model.path, "model.path")
    if spec.tokenizer.path:
        wanted.setdefault(spec.tokenizer.path, "tokenizer.path")
    metric = spec.search.objective.function if spec.search else None  # a user metric file
    if metric and metric.split(":")[0].endswith(".py"):
        wanted.setdefault(metric.split(":")[0], "search.objective.function")

    remote = {p: p if is_uri(p) else on_cluster(p, mapping) for p in wanted}
    local = [p for p in wanted if remote[p] is None]
    for p in local:
        if not Path(p).exists():
            raise UploadError(
                f"{wanted[p]}: {p} does not exist here; a path that exists only on the "
                "cluster's shared filesystem needs --shared PREFIX (or LOCAL=CLUSTER)"
            )
    sizes = {p: _size(Path(p)) for p in local}
    total = sum(sizes.values()) + extra_bytes
    if total > limit:
        big = sorted(sizes, key=sizes.get, reverse=True)[:3]
        listed = ", ".join(f"{wanted[p]} {p} ({_human(sizes[p])})" for p in big)
        raise UploadError(
            f"the job's local files come to {_human(total)}, above the {_human(limit)} that "
            f"Ray uploads with a job (largest: {listed}); put them on a filesystem the nodes "
            "share and pass --shared PREFIX (or LOCAL=CLUSTER), or on remote storage "
            "(s3://, gs://, hdfs://)"
        )

    folder = Path(tempfile.mkdtemp(prefix="untrac-ray-submit-"))
    uploaded: dict[str, str] = {}
    try:
        for i, p in enumerate(local):
            src = Path(p)
            rel = f"files/{i}/{src.name}"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, folder / rel)
            else:
                shutil.copy2(src, folder / rel)
            uploaded[p] = rel
        where = {p: uploaded.get(p) or remote[p] for p in wanted}
        staged = spec.model_copy(deep=True)
        for ds in _datasets(staged):
            ds.source = where[ds.source]
        if commit is not None:
            staged.model.revision = commit
        elif staged.model.path:
            staged.model.path = where[staged.model.path]
        if staged.tokenizer.path:
            staged.tokenizer.path = where[staged.tokenizer.path]
        # Outputs and caches stay on the cluster: on the shared filesystem when they are
        # under a shared prefix, else in the job's own folder there.
        for part in _parts(staged):
            out = getattr(part, "output_dir", None)
            if isinstance(out, str) and not is_uri(out):
                part.output_dir = on_cluster(out, mapping)
        if staged.cache_dir and not is_uri(staged.cache_dir):
            staged.cache_dir = on_cluster(staged.cache_dir, mapping)
        if staged.search is not None:  # Tune's storage like a cache; the metric file uploaded
            s = staged.search
            if s.storage_path and not is_uri(s.storage_path):
                s.storage_path = on_cluster(s.storage_path, mapping)
            if metric and metric.split(":")[0] in where:
                s.objective.function = f"{where[metric.split(':')[0]]}:{metric.split(':')[1]}"
        text, secrets = to_placeholders(staged.to_yaml())
        (folder / STAGED_SPEC).write_text(text, encoding="utf-8")
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        if commit is not None and token:  # a private or gated model, downloaded on the head
            secrets["HF_TOKEN"] = token
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    passed = [remote[p] for p in wanted if remote[p] is not None]
    return StagedJob(folder, Path(job_file), spec, uploaded, [redact(p) for p in passed], total,
                     secrets)


def package_dir() -> Path:
    """The folder of the untrac_ray package (shipped to the cluster as a py_module)."""
    return Path(__file__).resolve().parents[1]


def package_size() -> int:
    return sum(
        f.stat().st_size for f in package_dir().rglob("*")
        if f.is_file() and "__pycache__" not in f.parts
    )


def cluster_tracking_uri(cli_uri: str | None, spec: JobSpec) -> str:
    """Where the cluster job logs: --tracking-uri, MLFLOW_TRACKING_URI, the spec's tracking.uri.

    A relative SQLite path is made absolute (it only works where the cluster shares this
    filesystem); with none of the three, a clear error: the default local store would stay
    on the head.
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri
    if not uri:
        raise InputError(
            "a cluster job logs to your MLflow tracking server: pass --tracking-uri "
            "http://MLFLOW-HOST:5000 or set tracking.uri in the spec"
        )
    uri = absolute_sqlite_uri(uri)
    return uri


MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "MLFLOW_TRACKING_TOKEN")


def tracking_credentials(tracking_uri: str,
                         environ: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The tracking URI a cluster job is given (never with a password in it) and the
    environment variables that carry its credentials instead: the URI's user:password, else
    this shell's MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN."""
    env = os.environ if environ is None else environ
    clean, creds = split_credentials(tracking_uri)
    if not creds:
        creds = {k: env[k] for k in MLFLOW_CREDENTIALS if env.get(k)}
    return clean, creds


COMMANDS = ("run", "run --resume", "run --resume-if-any", "tune", "tune --resume")


def check_command(command: str) -> None:
    """InputError (one line) unless `command` is one a submitted job can run."""
    if command not in COMMANDS:
        raise InputError(f"--command: expected one of {', '.join(map(repr, COMMANDS))} "
                         f"(got {command!r})")


def entrypoint(python: str, tracking_uri: str, spec_file: str = STAGED_SPEC,
               command: str = "run") -> str:
    """The shell command a submitted job runs on the head (its environment, its interpreter).

    `command` is `run` or `tune` (the job's hyperparameter search), each possibly followed by
    `--resume` (continue the job's unfinished run or search); `run --resume-if-any` continues
    one if there is one, else starts anew (what a retried KubeRay RayJob runs)."""
    check_command(command)
    if has_secret(tracking_uri):
        raise InputError("a tracking URI with credentials never goes on a command line: "
                          "pass them as MLFLOW_TRACKING_USERNAME/PASSWORD (see job_request)")
    parts = [python, "-m", "untrac_ray.cli", *command.split(), spec_file, "--address", "auto",
             "--tracking-uri", tracking_uri]
    return " ".join(shlex.quote(p) for p in parts)


STOP_GRACE_S = 30  # how long `stop` lets the driver close its run before Ray kills it


def job_request(staged: StagedJob, tracking_uri: str, submission_id: str, *,
                python: str = "python", ship_package: bool = True,
                pip: list[str] | tuple[str, ...] = (), command: str = "run",
                environ: dict[str, str] | None = None) -> dict[str, Any]:
    """What is sent to the Jobs API for a staged job: entrypoint, runtime_env, metadata.

    No credential is in the entrypoint (the head's process table, `ray job list`), the
    metadata or the staged files: the tracking URI's and the spec's secrets are environment
    variables of the job's runtime environment (readable through the Jobs API, which the
    cluster's token protects)."""
    clean_uri, env_vars = tracking_credentials(tracking_uri, environ)
    runtime_env: dict[str, Any] = {
        "working_dir": str(staged.folder),
        # `stop` interrupts the driver (KeyboardInterrupt), so its MLflow run ends KILLED;
        # Ray's default of 3 s before SIGKILL was too short for that on a busy head
        "env_vars": {SUBMISSION_ENV: submission_id, "RAY_JOB_STOP_SIGNAL": "SIGINT",
                     "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S), **env_vars,
                     **staged.secrets},
    }
    if ship_package:
        runtime_env["py_modules"] = [str(package_dir())]
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
    if pip:
        runtime_env["pip"] = list(pip)
    metadata = {
        META_JOB: staged.spec.name,
        META_SPEC: staged.job_file.name,
        META_TRACKING: redact(clean_uri),
        "job_name": staged.spec.name,
    }
    return {"entrypoint": entrypoint(python, clean_uri, command=command),
            "runtime_env": runtime_env, "metadata": metadata}


def new_submission_id(job_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-")[:40] or "job"
    return f"untrac-{slug}-{secrets.token_hex(4)}"


def submission_id_here(environ: dict[str, str] | None = None) -> str | None:
    """The Ray submission id of the job this process runs in, if any.

    Set by `submit` (UNTRAC_RAY_SUBMISSION_ID); for jobs submitted otherwise (`ray job submit`,
    a KubeRay RayJob) it is read from the job config Ray hands to the entrypoint.
    """
    env = os.environ if environ is None else environ
    if env.get(SUBMISSION_ENV):
        return env[SUBMISSION_ENV]
    raw = env.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return json.loads(raw).get("metadata", {}).get("job_submission_id") or None
    return None


def submission_tags(environ: dict[str, str] | None = None) -> dict[str, str]:
    """MLflow tags naming the Ray submission this run belongs to (none outside a job)."""
    sid = submission_id_here(environ)
    return {SUBMISSION_TAG: sid} if sid else {}
