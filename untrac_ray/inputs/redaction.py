"""Credentials kept out of everything untrac-ray prints, logs to MLflow, stages or puts on a
command line.

One rule, `redact(text)`, for any text:
- the `user:password@` part of a URI becomes `***@`;
- the value of a URI query parameter whose name says it holds a secret (token, signature, key,
  password, credential, ...) becomes `***`;
- every secret value this process has learnt becomes `***`: the passwords and secret query
  values of the URIs it was given (`learn`), and the values of the environment's credential
  variables (`learn_environment`: MLFLOW_TRACKING_PASSWORD, RAY_AUTH_TOKEN, AWS_SECRET_...,
  HF_TOKEN);
- a Hugging Face token (`hf_` and 30 or more letters and digits) becomes `***`, learnt or not.

The CLI wraps stdout and stderr in `RedactingStream` before anything else runs, so every line a
command prints, and every line Ray forwards from its workers, goes through the rule; what goes
to MLflow (params, tags, text artifacts) passes through it in results/tracking.py.

Secrets travel by environment variables, never in text: `split_credentials` turns a tracking
URI's user:password into MLflow's MLFLOW_TRACKING_USERNAME/PASSWORD, and `to_placeholders`
replaces the secret parts of URIs in a staged job file by `${UNTRAC_RAY_SECRET_<n>}`, which
`expand_env` (called by the spec loader) fills in from the job's environment on the cluster.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import unquote

MASK = "***"
PLACEHOLDER_PREFIX = "UNTRAC_RAY_SECRET_"
MIN_SECRET_LENGTH = 6  # shorter learnt values are masked only where a URI shows them

# a URI's scheme and user-info: scheme://userinfo@
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/@'\"<>?#]+)@")
# a query parameter: ?name=value or &name=value
_QUERY = re.compile(r"(?P<head>[?&;](?P<name>[\w.\-~%]+)=)(?P<value>[^&#\s'\"<>]*)")
_SECRET_PARAM = re.compile(
    r"(?i)(pass(word|wd)?|pwd|token|secret|credential|signature|\bsig\b|key|auth|sas)")
_SECRET_ENV = re.compile(
    r"(?i)(PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY)")
_NOT_SECRET_ENV = re.compile(r"(?i)(_PATH|_FILE|_DIR|_ID|_MODE|_URI|_URL)$")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")

_learnt: set[str] = set()


def learn(*values: str | None) -> None:
    """Remember the secret parts of URIs (or texts holding URIs), to mask them anywhere later."""
    for value in values:
        if not value:
            continue
        for match in _USERINFO.finditer(value):
            _, _, password = match["userinfo"].partition(":")
            _remember(password)
        for match in _QUERY.finditer(value):
            if _SECRET_PARAM.search(match["name"]):
                _remember(match["value"])


def learn_secret(*values: str | None) -> None:
    """Remember values that are secrets in themselves (a token, a password)."""
    for value in values:
        _remember(value)


def learn_environment(environ: Mapping[str, str] | None = None) -> None:
    """Remember the values of the environment's credential variables and the secret parts of
    URIs it holds (MLFLOW_TRACKING_URI with a password, say)."""
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if _SECRET_ENV.search(name) and not _NOT_SECRET_ENV.search(name):
            _remember(value)
        elif "://" in value:
            learn(value)


def _remember(value: str | None) -> None:
    if not value:
        return
    for form in {value, unquote(value)}:
        if len(form) >= MIN_SECRET_LENGTH:
            _learnt.add(form)


def redact(text: str) -> str:
    """`text` with every credential masked (see the module docstring for the rule)."""
    if not text:
        return text
    if "://" in text:
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "=" in text:
        text = _QUERY.sub(
            lambda m: f"{m['head']}{MASK}" if _SECRET_PARAM.search(m["name"]) and m["value"]
            else m[0], text)
    for secret in sorted(_learnt, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    if "hf_" in text:
        text = _HF_TOKEN.sub(MASK, text)
    return text


def redact_values(value: Any) -> Any:
    """A copy of nested mappings and lists with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_values(v) for v in value]
    return value


def has_secret(text: str) -> bool:
    """True when `redact` would change `text`."""
    return redact(text) != text


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An MLflow tracking URI without its user:password, and the environment variables MLflow
    reads them from instead (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)."""
    match = _USERINFO.search(uri)
    if match is None or match.start() != 0:
        return uri, {}
    user, _, password = match["userinfo"].partition(":")
    env = {"MLFLOW_TRACKING_USERNAME": unquote(user)}
    if password:
        env["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return match["scheme"] + uri[match.end():], env


def to_placeholders(text: str, prefix: str = PLACEHOLDER_PREFIX) -> tuple[str, dict[str, str]]:
    """`text` with the secret parts of its URIs (user-info, secret query values) replaced by
    `${<prefix><n>}`, and the values those names stand for (one name per distinct value)."""
    names: dict[str, str] = {}

    def name_for(value: str) -> str:
        if value not in names:
            names[value] = f"{prefix}{len(names)}"
        return "${" + names[value] + "}"

    text = _USERINFO.sub(lambda m: f"{m['scheme']}{name_for(m['userinfo'])}@", text)
    text = _QUERY.sub(
        lambda m: f"{m['head']}{name_for(m['value'])}"
        if _SECRET_PARAM.search(m["name"]) and m["value"] else m[0], text)
    return text, {name: value for value, name in names.items()}


def expand_env(value: str, environ: Mapping[str, str] | None = None) -> str:
    """`value` with each `${NAME}` replaced by that environment variable (KeyError naming the
    first one that is not set). Values filled into a URI are learnt as secrets."""
    if "${" not in value:
        return value
    env = os.environ if environ is None else environ

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in env:
            raise KeyError(name)
        if name.startswith(PLACEHOLDER_PREFIX) or _SECRET_ENV.search(name):
            _remember(env[name])
        return env[name]

    expanded = _ENV_REF.sub(fill, value)
    learn(expanded)
    return expanded


class RedactingStream(io.TextIOBase):
    """A text stream that masks credentials (`redact`) in everything written to it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return not self.closed and self.stream.isatty()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        """The wrapped stream's state (a closed one, e.g. at exit, is no terminal)."""
        return bool(getattr(self.stream, "closed", False))

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)


def install_output_redaction() -> None:
    """Mask credentials in all this process writes to stdout and stderr (idempotent), after
    learning the environment's credentials."""
    learn_environment()
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
