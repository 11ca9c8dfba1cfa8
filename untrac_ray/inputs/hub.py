"""Models named by a Hugging Face Hub id: `model.path: EleutherAI/pythia-160m` (an `org/name` or
`name` that is no local path), at `model.revision` (a branch, tag or commit; default main),
resolved to a local snapshot folder and its 40-hex commit through the Hugging Face cache.

`resolve_hub_model` is the one resolution: from the cache when HF_HUB_OFFLINE is set (the
network is never touched then) or the Hub cannot be reached, else asking the Hub which commit
the revision names and downloading that commit's config, tokenizer and one weight format. A
token comes from the environment (HF_TOKEN, as huggingface_hub reads it); it is never passed,
printed or kept here. Every error is one line (ModelError) naming model.path or model.revision.

`model_commit` and `model_folder` are what the rest of the job uses: for a Hub id the commit
(pinned on first use, without downloading) and the snapshot folder of that commit, for a local
folder None and the folder itself. They remember their answer on the ModelSpec, so that a job
resolves a branch once and every later use (key, summary, loading) sees the same commit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from untrac_ray.inputs.errors import ModelError
from untrac_ray.inputs.model_folder import WEIGHT_FILES
from untrac_ray.inputs.redaction import redact

COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
# What a snapshot is downloaded with: config, tokenizer and generation files, and one weight
# format (safetensors when the repo has them, else PyTorch's .bin).
_ALWAYS = ["*.json", "*.txt", "*.model", "*.tiktoken"]
DEFAULT_REVISION = "main"


def looks_like_hub_id(path: str | None) -> bool:
    """True for an `org/name` or `name` that is written as a Hub id, not a filesystem path or
    a URI: no leading / . ~, no backslash or ://, at most one /, the Hub's characters."""
    if not path or "://" in path or "\\" in path or path.startswith(("/", ".", "~")):
        return False
    parts = path.split("/")
    return (len(parts) <= 2 and len(path) <= 96 and "--" not in path and ".." not in path
            and all(_REPO_PART.fullmatch(p) for p in parts))


def is_hub_id(path: str | None, base: Path | None = None) -> bool:
    """True when model.path names a Hub repo: it looks like a Hub id and is not an existing
    local path (taken from `base`, the job file's folder, when given)."""
    return looks_like_hub_id(path) and not Path(base or ".", path).exists()  # type: ignore[arg-type]


def hub_cache_dir() -> Path:
    """The Hugging Face cache's hub folder, read from the environment now (HF_HUB_CACHE, else
    HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = Path(home, "hub")
    return Path(cache).expanduser()


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: resolve from the cache only."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((f or "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


class _Unreachable(Exception):
    """The Hub could not be asked (no network, huggingface_hub set offline at import)."""


def _repo_folder(repo_id: str, cache: Path) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _cached(repo_id: str, revision: str, cache: Path, why: str) -> tuple[str, str]:
    """(snapshot folder, commit) of a revision in the cache; ModelError when it is not there,
    `why` saying why the Hub was not asked."""
    repo = _repo_folder(repo_id, cache)
    if not (repo / "snapshots").is_dir():
        raise ModelError(f"model.path: {repo_id} is not in the Hugging Face cache ({cache}) "
                         f"and {why}: download it where the Hub is reachable (`hf download "
                         f"{repo_id}`), point HF_HUB_CACHE at a cache that holds it, or give "
                         "a local model folder")
    commit = revision if COMMIT.fullmatch(revision) else None
    ref = repo / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    if commit is None or not (repo / "snapshots" / commit).is_dir():
        held = sorted(p.name for p in (repo / "refs").glob("*") if p.is_file()) + sorted(
            p.name[:12] for p in (repo / "snapshots").iterdir() if p.is_dir())
        raise ModelError(f"model.revision: {revision!r} of {repo_id} is not in the Hugging "
                         f"Face cache ({cache}; it holds {', '.join(held) or 'nothing'}) and "
                         f"{why}: use a revision the cache holds, or resolve it where the Hub "
                         "is reachable")
    return str(repo / "snapshots" / commit), commit


def _ask_hub(repo_id: str, revision: str) -> Any:
    """The Hub's ModelInfo of a revision (its commit `sha`, its files); ModelError for an
    unknown repo or revision or a refused access, _Unreachable when the Hub cannot be asked."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi().model_info(repo_id, revision=revision)
    except GatedRepoError:
        raise ModelError(f"model.path: {repo_id} is gated on the Hugging Face Hub: accept its "
                         "terms there and set HF_TOKEN in the environment") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model.path: {repo_id} is not a model on the Hugging Face Hub (or "
                         "it is private: set HF_TOKEN in the environment)") from None
    except RevisionNotFoundError:
        raise ModelError(f"model.revision: {revision!r} is not a branch, tag or commit of "
                         f"{repo_id} on the Hugging Face Hub") from None
    except OfflineModeIsEnabled as err:
        raise _Unreachable("huggingface_hub is set offline") from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status is not None and status < 500 and status != 429:
            raise ModelError(f"model.path: the Hugging Face Hub refused {repo_id} (HTTP "
                             f"{status}); a private model needs HF_TOKEN in the "
                             "environment") from None
        raise _Unreachable(f"the Hub answered HTTP {status}") from err
    except Exception as err:  # noqa: BLE001 - no network, a timeout: try the cache
        raise _Unreachable(redact(f"{type(err).__name__}: {err}".splitlines()[0])) from err


def _weights_of(files: list[str]) -> list[str]:
    """The patterns to download for a repo's files: config and tokenizer, one weight format."""
    top = {f for f in files if "/" not in f}
    if not any(w in top for w in WEIGHT_FILES):
        return []
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in top) else "*.bin"
    return [*_ALWAYS, weights]


def _check_snapshot(repo_id: str, commit: str, folder: str) -> None:
    where = f"model.path: {repo_id} at {commit[:12]} ({folder})"
    if not Path(folder, "config.json").is_file():
        raise ModelError(f"{where} has no config.json: not a transformers model")
    if not any(Path(folder, f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"{where} has no weights (expected one of {', '.join(WEIGHT_FILES)})")


def hub_commit(repo_id: str, revision: str = DEFAULT_REVISION) -> str:
    """The 40-hex commit a revision names, without downloading: a commit as it is, else from
    the cache offline (or when the Hub cannot be reached), else the Hub's answer."""
    if COMMIT.fullmatch(revision):
        return revision
    cache = hub_cache_dir()
    if hub_offline():
        return _cached(repo_id, revision, cache, "HF_HUB_OFFLINE is set")[1]
    try:
        return str(_ask_hub(repo_id, revision).sha)
    except _Unreachable as err:
        return _cached(repo_id, revision, cache, f"the Hub cannot be reached ({err})")[1]


def resolve_hub_model(repo_id: str, revision: str = DEFAULT_REVISION) -> tuple[str, str]:
    """(local snapshot folder, 40-hex commit) of a Hub model at a revision: from the cache
    when offline or the Hub is unreachable, else that commit downloaded into the cache."""
    cache = hub_cache_dir()
    why = "HF_HUB_OFFLINE is set"
    if not hub_offline():
        try:
            info = _ask_hub(repo_id, revision)
        except _Unreachable as err:
            why = f"the Hub cannot be reached ({err})"
        else:
            commit = str(info.sha)
            patterns = _weights_of([s.rfilename for s in info.siblings or []])
            if not patterns:
                raise ModelError(f"model.path: {repo_id} at {commit[:12]} has no weights on "
                                 f"the Hub (expected one of {', '.join(WEIGHT_FILES)})")
            from huggingface_hub import snapshot_download

            try:
                folder = snapshot_download(repo_id, revision=commit, cache_dir=str(cache),
                                           allow_patterns=patterns)
            except Exception as err:  # noqa: BLE001
                reason = redact(f"{type(err).__name__}: {err}".splitlines()[0])
                raise ModelError(f"model.path: cannot download {repo_id} at {commit[:12]} "
                                 f"into {cache}: {reason}") from None
            _check_snapshot(repo_id, commit, folder)
            return folder, commit
    folder, commit = _cached(repo_id, revision, cache, why)
    _check_snapshot(repo_id, commit, folder)
    return folder, commit


def model_commit(model: Any) -> str | None:
    """The commit of a ModelSpec's Hub model (None for a local folder or a config), resolved
    once and remembered on the spec."""
    if not is_hub_id(model.path):
        return None
    memo = model._hub
    if memo is not None and memo[:2] == (model.path, model.revision):
        return memo[2]
    commit = hub_commit(model.path, model.revision)
    model._hub = (model.path, model.revision, commit, None)
    return commit


def model_folder(model: Any) -> str | None:
    """The local folder of a ModelSpec's model.path: a Hub model's snapshot folder at its
    commit (downloaded when needed, remembered on the spec), a local folder as it is."""
    if not is_hub_id(model.path):
        return model.path
    commit = model_commit(model)
    if model._hub[3] is None:
        folder, _ = resolve_hub_model(model.path, commit)
        model._hub = (model.path, model.revision, commit, folder)
    return model._hub[3]


def describe_model(model: Any) -> str:
    """Where the model comes from, for a summary: `from the Hub org/name at <commit[:12]>`,
    `at <folder>`, or `built from model.config`."""
    if model.path is None:
        return "built from model.config"
    commit = model_commit(model)
    return f"from the Hub {model.path} at {commit[:12]}" if commit else f"at {model.path}"
