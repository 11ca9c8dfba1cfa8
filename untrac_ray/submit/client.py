"""The Ray Jobs API client: the cluster's address and token, submitting a staged job
(staging.py), its status, logs, stop, and the list of jobs.

The token of a cluster with token authentication is found the way Ray finds it
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and sent as a bearer header; it is
never printed or logged. Nothing here prints or parses arguments; errors are UntracError
subclasses with one-line messages. The Typer commands are in cli/cluster.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from untrac_ray.inputs.errors import InputError, UntracError
from untrac_ray.inputs.redaction import redact
from untrac_ray.submit.staging import (
    META_JOB,
    StagedJob,
    job_request,
    new_submission_id,
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
_RUN_LINE = re.compile(r"MLflow run ([0-9a-f]{32}) in ")
_TOKEN_HELP = (
    "set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at the token file, or put it in "
    "~/.ray/auth_token (on the head: `ray get-auth-token`)"
)


class ClusterError(InputError):
    """The cluster cannot be reached or asked (no address, no answer, unknown job)."""


class ClusterAuthError(ClusterError):
    """The cluster wants a token that was not found, or refused the one sent."""

# ---------------------------------------------------------------- address and token


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: --address, else RAY_ADDRESS, else a clear error."""
    given = address or os.environ.get("RAY_ADDRESS")
    if not given:
        raise ClusterError(
            "no Ray cluster address: pass --address http://HEAD:8265 (the dashboard) or set "
            "RAY_ADDRESS"
        )
    given = given.strip().rstrip("/")
    if given == "auto" or given.startswith("ray://"):
        raise ClusterError(
            f"address {given!r} is not a Jobs API address; give the head's dashboard URL, "
            "such as http://HEAD:8265"
        )
    if "://" not in given:
        given = f"http://{given}"
    if urlsplit(given).scheme not in ("http", "https"):
        raise ClusterError(f"address {given!r}: expected an http:// or https:// URL")
    return given


@dataclass(frozen=True)
class Token:
    """A cluster token and where it came from (the value never appears in messages)."""

    value: str
    source: str

    def __repr__(self) -> str:  # keep the value out of tracebacks and logs
        return f"Token(source={self.source!r})"


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The token the way Ray looks for it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    Returns None when there is none (a cluster without token authentication needs none).
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise ClusterAuthError(f"RAY_AUTH_TOKEN_PATH names a file that does not exist: {path}")
        value = path.read_text().strip()
        if not value:
            raise ClusterAuthError(f"the token file {path} (RAY_AUTH_TOKEN_PATH) is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    path = (home or Path.home()) / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return Token(path.read_text().strip(), str(path))
    return None


def auth_headers(token: Token | None) -> dict[str, str]:
    """The bearer header for a token (empty without one)."""
    return {"Authorization": f"Bearer {token.value}"} if token else {}


@contextlib.contextmanager
def _env_without(*names: str) -> Iterator[None]:
    """Hide environment variables for a moment (Ray's client lets RAY_ADDRESS override the
    address it is given; here --address wins)."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)

# ---------------------------------------------------------------- the cluster


@dataclass
class JobRow:
    """One line of `untrac-ray jobs`."""

    submission_id: str
    job_name: str
    status: str
    start: float | None  # seconds since the epoch
    end: float | None
    mlflow_run: str | None
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def duration(self) -> float | None:
        if self.start is None:
            return None
        return (self.end or time.time()) - self.start


@dataclass
class Submitted:
    submission_id: str
    entrypoint: str
    tracking_uri: str
    uploaded: dict[str, str]
    passed: list[str]
    size: int


class Cluster:
    """A Ray cluster's Jobs API, with clear errors instead of tracebacks."""

    def __init__(self, address: str | None = None, timeout: float = 10.0) -> None:
        self.url = resolve_address(address)
        self.token = find_token()
        self._check(timeout)
        from ray.job_submission import JobSubmissionClient

        for name in ("ray.dashboard", "ray._private.runtime_env"):  # upload/websocket chatter
            logging.getLogger(name).setLevel(logging.WARNING)

        with _env_without("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"), self._errors():
            self.client = JobSubmissionClient(self.url, headers=auth_headers(self.token))

    def _check(self, timeout: float) -> None:
        """Ask the dashboard for its version with a deadline (Ray's client has none)."""
        import requests

        try:
            r = requests.get(f"{self.url}/api/version", headers=auth_headers(self.token),
                             timeout=timeout)
        except requests.exceptions.RequestException as err:
            reason = type(err).__name__
            raise ClusterError(
                f"no Ray cluster answers at {self.url} ({reason}); is the head running with "
                "its dashboard (ray start --head --include-dashboard true) and is this its "
                "dashboard port (8265 by default)?"
            ) from None
        self._raise_for_auth(r.status_code)
        if r.status_code != 200:
            raise ClusterError(
                f"{self.url} answered HTTP {r.status_code} to /api/version; is it a Ray "
                "dashboard?"
            )

    def _raise_for_auth(self, status: int) -> None:
        if status == 401:
            raise ClusterAuthError(
                f"the Ray cluster at {self.url} requires a token and none was found: "
                + _TOKEN_HELP
            )
        if status == 403:
            raise ClusterAuthError(
                f"the Ray cluster at {self.url} refused the token from "
                f"{self.token.source if self.token else '(none)'}; use that cluster's token"
            )

    @contextlib.contextmanager
    def _errors(self, job: str | None = None) -> Iterator[None]:
        """Ray's exceptions as one-line ClusterErrors."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except UntracError:
            raise
        except AuthenticationError as err:
            status = 403 if "Authentication failed" in str(err.message) else 401
            self._raise_for_auth(status)
            raise ClusterAuthError(f"the Ray cluster at {self.url} refused the request") from None
        except (requests.exceptions.RequestException, ConnectionError, OSError) as err:
            raise ClusterError(
                f"lost the Ray cluster at {self.url} ({type(err).__name__})"
            ) from None
        except RuntimeError as err:
            text = str(err)
            if job and ("does not exist" in text or "404" in text):
                raise ClusterError(f"no job {job!r} on the Ray cluster at {self.url}") from None
            first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            raise ClusterError(f"the Ray cluster at {self.url} refused: {first}") from None

    # -- submitting

    def submit(
        self,
        staged: StagedJob,
        tracking_uri: str,
        *,
        python: str = "python",
        ship_package: bool = True,
        pip: list[str] | tuple[str, ...] = (),
        submission_id: str | None = None,
        entrypoint_num_gpus: float | None = None,
        entrypoint_num_cpus: float | None = None,
        command: str = "run",
    ) -> Submitted:
        """Submit a staged job (see `stage_job`); the staged folder is uploaded by Ray."""
        sid = submission_id or new_submission_id(staged.spec.name)
        request = job_request(staged, tracking_uri, sid, python=python,
                              ship_package=ship_package, pip=pip, command=command)
        with self._errors():
            got = self.client.submit_job(
                submission_id=sid, entrypoint_num_gpus=entrypoint_num_gpus,
                entrypoint_num_cpus=entrypoint_num_cpus, **request,
            )
        return Submitted(got, request["entrypoint"], redact(tracking_uri), staged.uploaded,
                         staged.passed, staged.size)

    # -- watching

    def status(self, job: str) -> str:
        with self._errors(job):
            return str(self.client.get_job_status(job).value)

    def info(self, job: str) -> JobRow:
        with self._errors(job):
            details = self.client.get_job_info(job)
        return self._row(details, with_run=True)

    def logs(self, job: str) -> str:
        with self._errors(job):
            return self.client.get_job_logs(job)

    def follow(self, job: str, write: Callable[[str], None], poll: float = 1.0) -> str:
        """Stream a job's logs to `write` until it ends; returns its final status."""
        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job):
                write(chunk)

        with self._errors(job):
            self.client.get_job_status(job)  # an unknown id fails here, clearly
            try:
                asyncio.run(tail())
            except RuntimeError as err:
                if "does not exist" in str(err):
                    raise
                # the log socket closed early: fall back to polling below
            status = self.client.get_job_status(job)
            while not status.is_terminal():
                time.sleep(poll)
                status = self.client.get_job_status(job)
        return str(status.value)

    def wait(self, job: str, timeout: float, poll: float = 0.5) -> str:
        """Poll until the job ends or `timeout` seconds pass; returns the last status."""
        deadline = time.monotonic() + timeout
        status = self.status(job)
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(poll)
            status = self.status(job)
        return status

    def stop(self, job: str) -> bool:
        """Ask the cluster to stop a job; False when it had already ended."""
        with self._errors(job):
            return bool(self.client.stop_job(job))

    def jobs(self, everything: bool = False) -> list[JobRow]:
        """This cluster's untrac-ray jobs (all jobs with `everything`), oldest first."""
        with self._errors():
            listed = self.client.list_jobs()
        rows = [
            self._row(d, with_run=True) for d in listed
            if d.submission_id and (everything or META_JOB in (d.metadata or {}))
        ]
        return sorted(rows, key=lambda r: r.start or 0)

    def _row(self, details: Any, with_run: bool) -> JobRow:
        meta = dict(details.metadata or {})
        status = str(details.status.value)
        run = None
        if with_run and status == "SUCCEEDED" and details.submission_id:
            run = mlflow_run_from_logs(self.logs(details.submission_id))
        return JobRow(
            submission_id=details.submission_id or details.job_id or "",
            job_name=meta.get(META_JOB, meta.get("job_name", "")),
            status=status,
            start=details.start_time / 1000 if details.start_time else None,
            end=details.end_time / 1000 if details.end_time else None,
            mlflow_run=run,
            message=details.message or "",
            metadata=meta,
        )


def mlflow_run_from_logs(logs: str) -> str | None:
    """The MLflow run id `untrac-ray run` printed at its end, if it did."""
    found = _RUN_LINE.findall(logs)
    return found[-1] if found else None
