"""Where a search keeps its state beside Tune's (`search.storage_path`), and how `tune
--resume` finds the search it continues: the newest unfinished one of the same spec.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from untrac_ray.inputs.fingerprints import results_key
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.search.space import SearchError

STATE_FILE = "untrac_search.json"  # beside Tune's state: the parent run, the spec's hash


# ------------------------------------------------------------------ storage and resume


def storage_path(spec: JobSpec) -> str:
    """Where Tune keeps the search: search.storage_path, else <cache_dir>/tune."""
    given = spec.search.storage_path
    return given if given else str(Path(spec.cache_dir or ".untrac-ray").resolve() / "tune")


def storage_fs(uri: str):
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def write_state(uri: str, name: str, state: dict[str, Any]) -> None:
    fs, root = storage_fs(uri)
    fs.create_dir(f"{root}/{name}", recursive=True)
    with fs.open_output_stream(f"{root}/{name}/{STATE_FILE}") as f:
        f.write(json.dumps(state, indent=2, sort_keys=True).encode())


def list_searches(uri: str) -> list[dict[str, Any]]:
    """Every search kept under a storage path (its state, plus `name` and `path`)."""
    import pyarrow.fs as pafs

    fs, root = storage_fs(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_FILE}") as f:
                state = json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            continue
        base = uri if "://" in uri else root
        out.append({**state, "name": info.base_name,
                    "path": f"{base.rstrip('/')}/{info.base_name}"})
    return sorted(out, key=lambda s: s.get("created", 0))


def find_resumable(spec: JobSpec) -> dict[str, Any]:
    """The newest unfinished search of this job (same spec) under its storage path."""
    uri = storage_path(spec)
    mine = [s for s in list_searches(uri) if s.get("job") == spec.name]
    same = [s for s in mine if s.get("spec_key") == results_key(spec)]
    open_ = [s for s in same if not s.get("finished")]
    if open_:
        return open_[-1]
    if same:
        raise SearchError(f"nothing to resume: the searches of job {spec.name!r} in {uri} "
                          f"all finished (latest: {same[-1]['name']}, MLflow run "
                          f"{same[-1]['parent_run_id']}); run without --resume for a new one")
    if mine:
        raise SearchError(f"nothing to resume: job {spec.name!r} changed since its searches "
                          f"in {uri} (the spec's hash differs); run without --resume")
    raise SearchError(f"nothing to resume: no search of job {spec.name!r} in {uri} "
                      "(search.storage_path); run without --resume")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "search"


