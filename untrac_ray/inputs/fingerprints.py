"""Fingerprints: content hashes of what decides a result, so that a cached model, a stored
task or a run to resume is reused only when it would come out the same. A Hub model is keyed
by its commit (inputs/hub.py), never by a branch name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from untrac_ray.inputs.hub import model_commit, model_folder
from untrac_ray.inputs.sources import Shard, list_shards
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import DatasetSpec, is_uri


def spec_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(source: str) -> str:
    """Content hash of a local file or folder (size and mtime for large ones); URIs as given."""
    path = Path(source)
    if is_uri(source) or not path.exists():
        return source
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(str(f.relative_to(path.parent)).encode())
        if stat.st_size <= 64 * 2**20:
            digest.update(f.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def source_fingerprint(ds: DatasetSpec, shards: list[Shard] | None = None) -> str:
    """A short hash that changes when the source's shards change: their names and sizes,
    and the content of local files up to 64 MB (larger files and remote ones by size and
    modification time)."""
    shards = shards if shards is not None else list_shards(ds)
    digest = hashlib.blake2b(digest_size=8)
    for shard in shards:
        digest.update(f"{shard.path}\0{shard.size}\0".encode())
        if shard.format == "hf_disk" or (not is_uri(shard.path) and Path(shard.path).is_dir()):
            digest.update(file_fingerprint(shard.path).encode())
        elif not is_uri(shard.path) and shard.size <= 64 * 2**20:
            digest.update(Path(shard.path).read_bytes())
        else:
            digest.update(str(shard.mtime_ns).encode())
    return digest.hexdigest()


def model_material(spec: JobSpec) -> dict[str, Any]:
    """The model section as keys hash it: a Hub model's revision replaced by the commit it
    names (so main and that commit key alike, and a new commit on main keys anew), a
    revision left at main on a local folder or a config left out (keys from before it)."""
    material = spec.model.model_dump(mode="json")
    commit = model_commit(spec.model)
    if commit is not None:
        material["revision"] = commit
    elif material.get("revision") == "main":
        material.pop("revision")
    return material


def pretrain_key(spec: JobSpec) -> str:
    """Hash of what decides the pretrained starting point (model, tokenizer, pretraining)."""
    assert spec.pretraining is not None
    return spec_hash(
        model_material(spec), spec.tokenizer.model_dump(),
        spec.pretraining.training.model_dump(exclude={"output_dir"}),
        [ds.model_dump() for ds in spec.pretraining.data],
        [source_fingerprint(ds) for ds in spec.pretraining.data],
    )


def model_key(spec: JobSpec) -> str:
    """Hash of everything that decides the trained base model (model, tokenizer, data)."""
    return spec_hash(
        pretrain_key(spec) if spec.pretraining else None,
        model_material(spec),
        file_fingerprint(model_folder(spec.model)) if spec.model.finetune else None,
        spec.tokenizer.model_dump(),
        spec.training.model_dump(exclude={"output_dir"}),
        [ds.model_dump() for ds in spec.data.train],
        [source_fingerprint(ds) for ds in spec.data.train],
    )


# --- The results key: which settings decide a result ---

# The version of what a stored result means: the format of a finished task and the algorithms
# that compute it. A result stored under another version is never restored, so that an upgrade
# that changes how a task computes does not resume with results of the old way.
# 2: bf16 weights are stepped in float32 and rounded stochastically (compute/optim.py).
RESULTS_VERSION = 2

# The settings that never decide a result: the job's name, where and on how much it runs, how
# long it waits and how often it retries, where it logs and keeps files. Every other setting
# is in the key, a new one too: tests/test_spec.py walks the spec's fields to check that each
# is either in the key or here. Whether actors compute on GPUs does decide the numbers: the key
# keeps that (`on_gpu`) instead of gpus_per_actor.
NOT_IN_RESULTS_KEY: dict[str, Any] = {
    "name": True,
    "cache_dir": True,
    "tracking": True,
    "calibration": True,  # which calibration chose the method: cited, it changes no cell
    "training": {"output_dir"},
    "pretraining": {"training": {"output_dir"}},
    "resources": {"address", "num_actors", "cpus_per_actor", "gpus_per_actor", "local_cpus",
                  "object_store_memory_mb", "max_retries", "placement_timeout_s", "autoscale"},
    "search": {"storage_path", "max_concurrent", "max_failures", "actors_per_trial"},
}


# Settings added after results were stored, with the default that gives the results of before:
# hashed only when set otherwise, so that runs stored before them keep their keys (and resume).
# (model.revision: a Hub model's is keyed as its commit, see model_material.)
KEYED_UNLESS_DEFAULT: dict[tuple[str, ...], Any] = {
    ("model", "revision"): "main",
    ("methods", "ldo", "steps"): "epochs",
    ("methods", "lds", "steps"): "epochs",
}


def results_key_material(spec: JobSpec) -> dict[str, Any]:
    """What the results key hashes: the spec without NOT_IN_RESULTS_KEY (and without the
    settings of KEYED_UNLESS_DEFAULT left at their default), plus `on_gpu`."""
    material = spec.model_dump(mode="json", exclude=NOT_IN_RESULTS_KEY)
    material["model"] = model_material(spec)
    for (*parents, leaf), default in KEYED_UNLESS_DEFAULT.items():
        node: Any = material
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf, default) == default:
            node.pop(leaf, None)
    material["on_gpu"] = spec.resources.gpus_per_actor > 0
    return material


def results_key(spec: JobSpec) -> str:
    """The one key of a job's results, for `run` and `tune`: a run or search is resumed, and
    its finished tasks restored, only under the same key (RESULTS_VERSION included)."""
    return spec_hash(RESULTS_VERSION, results_key_material(spec))
