"""Fingerprints: content hashes of what decides a result, so that a cached model, a stored
task or a run to resume is reused only when it would come out the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import is_uri


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


def pretrain_key(spec: JobSpec) -> str:
    """Hash of what decides the pretrained starting point (model, tokenizer, pretraining)."""
    assert spec.pretraining is not None
    return spec_hash(
        spec.model.model_dump(), spec.tokenizer.model_dump(),
        spec.pretraining.training.model_dump(exclude={"output_dir"}),
        [ds.model_dump() for ds in spec.pretraining.data],
        [file_fingerprint(ds.source) for ds in spec.pretraining.data],
    )


def model_key(spec: JobSpec) -> str:
    """Hash of everything that decides the trained base model (model, tokenizer, data)."""
    return spec_hash(
        pretrain_key(spec) if spec.pretraining else None,
        spec.model.model_dump(),
        file_fingerprint(spec.model.path) if spec.model.finetune else None,
        spec.tokenizer.model_dump(),
        spec.training.model_dump(exclude={"output_dir"}),
        [ds.model_dump() for ds in spec.data.train],
        [file_fingerprint(ds.source) for ds in spec.data.train],
    )


def job_spec_key(spec: JobSpec) -> str:
    """Hash of the spec's settings that decide results: everything but where it runs and
    logs (tracking, resources other than numerics, a search's storage and concurrency)."""
    dump = spec.model_dump(mode="json", exclude={
        "tracking": True, "search": {"storage_path", "max_concurrent"}})
    dump["resources"] = {k: dump["resources"][k] for k in ("precision", "tf32")}
    return spec_hash(dump)
