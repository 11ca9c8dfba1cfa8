"""Loading a job spec: YAML read as UTF-8, `${NAME}` filled in from the environment, `--set
key.path=value` overrides applied, validated into a JobSpec (one line naming each bad key, an
unknown one with the nearest known key), relative paths made absolute from the job file's
folder (but for a Hugging Face Hub id in model.path, kept as it is). A YAML syntax error is
reported as `file:line:column: the problem`.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.hub import is_hub_id
from untrac_ray.inputs.redaction import expand_env
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import is_uri


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The spec model whose keys sit at `loc` (a key path, list indices and dict keys
    included), None when the path leaves the spec's models."""
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue  # a list index or a dict's own key: the same model below
        model = inner_model(model.model_fields[part].annotation)
    return model


def inner_model(annotation: Any) -> type[BaseModel] | None:
    """The spec model inside a field's annotation (X, X | None, list[X], dict[str, X]),
    None for a leaf setting."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = inner_model(arg)
        if found is not None:
            return found
    return None


def nearest_key(loc: tuple) -> str | None:
    """The known key closest to an unknown one (`loc` ends with it), if one is close."""
    parent = _model_at(loc[:-1])
    key = loc[-1]
    if parent is None or not isinstance(key, str):
        return None
    names = list(parent.model_fields)
    short = [n for n in names if key == "".join(w[0] for w in n.split("_") if w)
             or (len(key) >= 3 and n.startswith(key))]  # lr: learning_rate; optim: optimizer
    found = short or difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return found[0] if found else None


def _format_validation_error(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            near = nearest_key(tuple(e["loc"]))
            msg = f"unknown key (did you mean {near!r}?)" if near else "unknown key"
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

    if not is_hub_id(spec.model.path, base):  # a Hub id stays as it is (inputs/hub.py)
        spec.model.path = absolute(spec.model.path)
        tok = spec.tokenizer
        if tok.kind == "pretrained" and not tok.path:  # a local folder after all: its own
            tok.path = spec.model.path
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


def apply_overrides(raw: Any, overrides: Sequence[str], origin: str = "--set") -> Any:
    """A spec mapping with `key.path=value` settings applied before it is validated (what
    `--set` gives `run`, `validate`, `tune` and `submit`): the value is read as YAML (a number,
    true, a list, a mapping, else a string); a missing section is created; a list item by its
    index (data.train.0.max_rows=100). SpecError naming the setting when it cannot apply."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError(f"{origin} {item!r}: expected key.path=value, e.g. "
                            "methods.untrac.learning_rate=1e-4")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise SpecError(f"{origin} {item!r}: {key} is not a setting of the job")
        if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
            node[int(leaf)] = parsed
        elif isinstance(node, dict):
            node[leaf] = parsed
        else:
            raise SpecError(f"{origin} {item!r}: {key} is not a setting of the job")
    return raw


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read and validate a job YAML file, with `overrides` (key.path=value, see
    apply_overrides) applied first. Relative paths in it are taken from its folder."""
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
        raise SpecError(yaml_error(path, err)) from None
    raw = expand_env_refs(raw, origin=str(path))
    if overrides:
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: expected a mapping of keys at the top level")
        raw = apply_overrides(raw, overrides)
    return parse_spec(raw, origin=str(path), base_dir=path.resolve().parent)


def yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """A YAML syntax error as `file:line:column: the problem` (where the parser stopped;
    what it was inside of, and where that began, after it)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    inside = ""
    if context:
        start = getattr(err, "context_mark", None)
        at = f" (line {start.line + 1}, column {start.column + 1})" if start else ""
        inside = f", {context}{at}"
    lines = (getattr(mark, "buffer", None) or "").splitlines()
    line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    hint = (': a ${VAR} inside a {...} mapping needs quotes, "${VAR}"'
            if "${" in line and "flow" in (context or "") else "")
    return f"{where}: not valid YAML: {problem}{inside}{hint}"


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
