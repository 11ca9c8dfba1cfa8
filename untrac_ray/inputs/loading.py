"""Loading a job spec: YAML read as UTF-8, `${NAME}` filled in from the environment, validated
into a JobSpec (one line naming each bad key), relative paths made absolute from the job file's
folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.redaction import expand_env
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import is_uri


def _format_validation_error(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("model_type",) and not isinstance(
            e["input"], dict | list
        ):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{origin}: " + "; ".join(parts)


def _resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    def absolute(p: str | None) -> str | None:
        if p is None or is_uri(p) or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    spec.model.path = absolute(spec.model.path)
    if spec.tokenizer.path:
        spec.tokenizer.path = absolute(spec.tokenizer.path)
    spec.training.output_dir = absolute(spec.training.output_dir)
    spec.cache_dir = absolute(spec.cache_dir) or str(Path.cwd() / ".untrac-ray")
    pretraining = spec.pretraining.data if spec.pretraining else []
    for ds in [*spec.data.train, *spec.data.test, *pretraining]:
        ds.source = absolute(ds.source) or ds.source
    if spec.search is not None:  # a user metric given as a file, and Tune's storage
        spec.search.resolve_paths(absolute)
    return spec


def parse_spec(raw: Any, origin: str = "job spec", base_dir: Path | None = None) -> JobSpec:
    """Validate a spec given as a mapping; raise SpecError naming each bad key."""
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a mapping of keys at the top level")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None
    if base_dir is not None:
        spec = _resolve_paths(spec, base_dir)
    return spec


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job YAML file. Relative paths in it are taken from its folder."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"job file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise SpecError(f"job file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the job file: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at position {err.start}, "
            f"line {line}); save the file as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    raw = expand_env_refs(raw, origin=str(path))
    return parse_spec(raw, origin=str(path), base_dir=path.resolve().parent)


def expand_env_refs(raw: Any, origin: str = "job spec", where: str = "") -> Any:
    """Every `${NAME}` in the spec's strings replaced by that environment variable, so that a
    secret (a token in a data URI, say) need not be written in the job file; SpecError naming
    the key when a variable is not set."""
    if isinstance(raw, str):
        try:
            return expand_env(raw)
        except KeyError as err:
            raise SpecError(f"{origin}: {where or '(top level)'}: ${{{err.args[0]}}} is not set "
                            "in the environment") from None
    if isinstance(raw, dict):
        return {k: expand_env_refs(v, origin, f"{where}.{k}" if where else str(k))
                for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand_env_refs(v, origin, f"{where}.{i}") for i, v in enumerate(raw)]
    return raw


def absolute_sqlite_uri(uri: str) -> str:
    """A sqlite:/// tracking URI with a relative path made absolute (from the current folder),
    so that it names the same file from any process; other URIs as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri
