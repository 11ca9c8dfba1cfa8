"""The on-disk cache of tokenized sets: a folder per set, memory-mapped where it is read.

    <cache_dir>/tokenized/<name>-<key>/
        ids.bin          the set's token ids, raw (meta's dtype: uint16 or uint32)
        offsets.npy      prompt_target rows: row i spans offsets[i]:offsets[i+1] (int64)
        loss_start.npy   prompt_target rows: leading tokens without a loss (int32)
        meta.json        kind, dtype, tokens, rows, source_rows, block_size (text), and
                         content_hash (of ids and layout, computed while writing)

A text set stores only its stream of ids (labels are the ids; blocks are views of it). A set
is written to a temporary folder and renamed when complete, so a killed run leaves no half
cache. The key holds the dataset's spec and source fingerprint, the tokenizer settings and a
hash of the tokenizer's content (tokenization.tokenizer_fingerprint), so `validate` and `run`
agree on it and two tokenizers of the same size at the same path never share ids.

`StoredSet` is a set's small descriptor (what the object store carries to actors); `open`
memory-maps the folder. `tokenized_dataset` writes a set in this process, reading its source
unit by unit; the engine's data stage writes the same folder from Ray Data's output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from untrac_ray.inputs.data import read_plan, read_unit
from untrac_ray.inputs.fingerprints import source_fingerprint, spec_hash
from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec
from untrac_ray.inputs.tokenization import (
    SEPARATOR,
    Piece,
    SetBuilder,
    TokenizedSet,
    encode_batch,
    token_dtype,
    tokenizer_fingerprint,
)

STORE_VERSION = 2  # 1: Arrow tables of int32 ids and labels
META, IDS = "meta.json", "ids.bin"


@dataclass(frozen=True)
class StoredSet:
    """A tokenized set in the cache: where it is and what it holds (small; picklable).
    `arrays` is an object-store reference to its arrays, set by the driver where actors may
    not share the cache's filesystem (engine/data_stage.py)."""

    name: str
    folder: str
    content_hash: str
    kind: str
    dtype: str
    tokens: int
    rows: int
    source_rows: int
    block_size: int | None = None
    arrays: Any = None

    @property
    def meta(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype, "tokens": self.tokens,
                "rows": self.rows, "source_rows": self.source_rows,
                "block_size": self.block_size, "content_hash": self.content_hash}

    @property
    def stored_bytes(self) -> int:
        """Bytes of the set's files (ids and per-row arrays)."""
        return sum(p.stat().st_size for p in Path(self.folder).iterdir() if p.name != META)

    def folder_matches(self) -> bool:
        """Whether this process sees the set's folder, holding the same content."""
        try:
            meta = json.loads(Path(self.folder, META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return meta.get("content_hash") == self.content_hash

    def read_arrays(self) -> dict[str, np.ndarray]:
        """The set's arrays, memory-mapped read-only from its folder."""
        folder = Path(self.folder)
        arrays = {"ids": np.memmap(folder / IDS, dtype=self.dtype, mode="r",
                                   shape=(self.tokens,))}
        for name in ("offsets", "loss_start"):
            if (folder / f"{name}.npy").is_file():
                arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
        return arrays

    def open(self, pad_id: int, arrays: dict[str, np.ndarray] | None = None) -> TokenizedSet:
        """The torch-side view over the memory-mapped folder (or over `arrays` given)."""
        return TokenizedSet.from_arrays(self.name, self.meta, arrays or self.read_arrays(),
                                        pad_id)

    def without_ref(self) -> StoredSet:
        return replace(self, arrays=None)


def default_cache_dir() -> str:
    return str(Path(tempfile.gettempdir(), "untrac-ray-cache"))


def cache_key(ds: DatasetSpec, tok: PreTrainedTokenizerBase, spec: TokenizerSpec) -> str:
    """What decides a set's token ids: dataset, source, tokenizer settings and content."""
    return spec_hash(ds.model_dump(), source_fingerprint(ds), spec.model_dump(),
                     tokenizer_fingerprint(tok), SEPARATOR, STORE_VERSION)


def set_folder(ds: DatasetSpec, tok: PreTrainedTokenizerBase, spec: TokenizerSpec,
               cache_dir: str | None) -> Path:
    return Path(cache_dir or default_cache_dir(), "tokenized",
                f"{ds.name}-{cache_key(ds, tok, spec)}")


def _stored(name: str, folder: Path, meta: dict) -> StoredSet:
    return StoredSet(name, str(folder), meta["content_hash"], meta["kind"], meta["dtype"],
                     meta["tokens"], meta["rows"], meta["source_rows"], meta.get("block_size"))


def find_cached(name: str, folder: Path) -> StoredSet | None:
    """The set cached in `folder`, if a complete one is there."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _stored(name, folder, meta)


class SetWriter:
    """Writes one set's folder as its pieces arrive in order: a temporary folder beside it,
    renamed by `commit`; left unfinished (an error, a kill) it is removed or never seen."""

    def __init__(self, ds: DatasetSpec, spec: TokenizerSpec, dtype: np.dtype, folder: Path):
        self.ds, self.folder = ds, folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        self.file = open(self.tmp / IDS, "wb")  # noqa: SIM115 - closed in commit/abort
        self.builder = SetBuilder(ds, spec, dtype, sink=self.file)

    def add(self, piece: Piece) -> None:
        self.builder.add(piece)

    def commit(self) -> StoredSet:
        self.file.close()
        meta, arrays = self.builder.finish()
        for name, values in arrays.items():
            np.save(self.tmp / f"{name}.npy", values)
        (self.tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(self.tmp, self.folder)
        except OSError:  # written meanwhile by another job: the same content, keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        return _stored(self.ds.name, self.folder, meta)

    def abort(self) -> None:
        self.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> SetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_set(ds: DatasetSpec, spec: TokenizerSpec, dtype: np.dtype, folder: Path,
              pieces: Iterable[Piece],
              on_piece: Callable[[int, int], None] | None = None) -> StoredSet:
    """Write a set's folder from its pieces in corpus order; `on_piece(rows, tokens)` after
    each (totals so far)."""
    with SetWriter(ds, spec, dtype, folder) as writer:
        for piece in pieces:
            writer.add(piece)
            if on_piece is not None:
                on_piece(writer.builder.source_rows, writer.builder.tokens)
        return writer.commit()


def tokenized_dataset(
    ds: DatasetSpec, tok: PreTrainedTokenizerBase, spec: TokenizerSpec, cache_dir: str | None,
    on_piece: Callable[[int, int], None] | None = None,
) -> StoredSet:
    """A set from the cache, else tokenized in this process (unit by unit, batch by batch:
    memory holds a batch, not the corpus) and cached."""
    folder = set_folder(ds, tok, spec, cache_dir)
    found = find_cached(ds.name, folder)
    if found is not None:
        return found
    dtype = token_dtype(tok)
    pieces = (encode_batch(ds, batch, tok, spec, dtype)
              for unit in read_plan(ds) for batch in read_unit(ds, unit))
    return write_set(ds, spec, dtype, folder, pieces, on_piece)
