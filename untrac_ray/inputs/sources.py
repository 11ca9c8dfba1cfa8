"""Where a dataset's rows are: its `source` (a file, a folder of shards or a glob, local or at
a URI that pyarrow's filesystems open: s3://, gs://, hdfs://, file://) turned into a sorted
list of shards, each with its format and compression. Reading the shards is data.py's job;
nothing here reads a row (fingerprints.source_fingerprint says when the shards changed).

A shard's format comes from its suffix (`.parquet`/`.pq`, `.csv`, `.jsonl`/`.json`/`.ndjson`,
each optionally compressed: `.gz`, `.zst`, `.bz2`, `.lz4`), or from the dataset's `format` for
every shard. A folder is read by what it holds: a Hugging Face `save_to_disk` folder (its
`state.json` and `dataset_info.json`) is one `hf_disk` source, any other folder the files
under it (hidden files, `_SUCCESS` markers and the like left out).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.spec_sections import DATA_FORMATS, DatasetSpec, is_uri

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd",
                ".bz2": "bz2", ".lz4": "lz4"}
FORMAT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": None,
                   ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Shard:
    """One file of a dataset's source: where it is, how to read it, and its size."""

    path: str  # a local path or a URI
    format: str  # parquet | csv | jsonl | hf_disk
    compression: str | None = None  # gzip | zstd | bz2 | lz4 (parquet compresses inside)
    size: int = 0
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return self.path


def shard_format(path: str, given: str | None = None) -> tuple[str | None, str | None]:
    """(format, compression) of a file from its name, `given` overriding the format; format
    None when the name does not say."""
    lower = path.lower().split("?", 1)[0]
    compression = None
    for suffix, codec in COMPRESSIONS.items():
        if lower.endswith(suffix):
            compression, lower = codec, lower[: -len(suffix)]
            break
    if given:
        return given, compression
    for suffix, fmt in FORMAT_SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt, compression
    return None, compression


def _filesystem(source: str):
    """(pyarrow filesystem, path in it) for a local path or a URI; DataError when the URI's
    filesystem cannot be opened (an unknown scheme, missing credentials)."""
    from pyarrow import fs

    if not is_uri(source):
        return fs.LocalFileSystem(), os.path.abspath(source)
    try:
        return fs.FileSystem.from_uri(source)
    except Exception as err:  # noqa: BLE001 - any opener error becomes one clear line
        raise DataError(f"cannot open {source}: {first_line(err)}") from None


def first_line(err: BaseException) -> str:
    """An error's first line (its type when it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_filesystem(shard: Shard):
    """(pyarrow filesystem, path in it) of one shard."""
    return _filesystem(shard.path)


def _uri_of(source: str, path: str) -> str:
    """The URI (or local path) of `path`, a path on the filesystem `source` was opened from."""
    if not is_uri(source):
        return path
    scheme = source.split("://", 1)[0]
    return f"file://{path}" if scheme == "file" else f"{scheme}://{path.lstrip('/')}"


def _split_glob(source: str) -> tuple[str, str | None]:
    """(the folder to list, the pattern below it) of a source; pattern None without glob
    characters."""
    rest = source.split("://", 1)[-1]
    if not any(c in rest for c in GLOB_CHARS):
        return source, None
    cut = len(source) - len(rest) + min(rest.find(c) for c in GLOB_CHARS if c in rest)
    slash = source.rfind("/", 0, cut)
    if slash < 0:
        return ".", source
    return source[: slash + 1], source[slash + 1 :]


def _matches(path: str, folder: str, pattern: str) -> bool:
    """True when `path` (under `folder`) matches the glob `pattern`: `*` within one path
    segment, `**` across any number."""
    rel = path[len(folder.rstrip("/")) + 1 :] if path.startswith(folder.rstrip("/")) else path
    if "**" not in pattern and rel.count("/") != pattern.count("/"):
        return False
    return fnmatch.fnmatchcase(rel, pattern.replace("**/", "*").replace("**", "*"))


def _is_hf_disk(filesystem, folder: str) -> bool:
    from pyarrow import fs

    names = {"state.json", "dataset_info.json", "dataset_dict.json"}
    infos = filesystem.get_file_info([f"{folder.rstrip('/')}/{n}" for n in names])
    return any(i.type == fs.FileType.File for i in infos)


def _skipped(name: str) -> bool:
    """Files a shard folder holds beside its shards: hidden, `_SUCCESS`, checksums."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith((".", "_")) or base.endswith((".crc", ".md", ".txt", ".json.lock"))


def list_shards(ds: DatasetSpec) -> list[Shard]:
    """The shards of a dataset's source, sorted by path (DataError, one line, when there are
    none or one's format cannot be told)."""
    from pyarrow import fs

    source, where = ds.source, f"dataset {ds.name!r}"
    # A URI's ?query (credentials, a region) is not part of its path, nor a glob: every
    # shard's URI carries it on.
    located, query = source, ""
    if is_uri(source) and "?" in source:
        located, rest = source.split("?", 1)
        query = f"?{rest}"
    base, pattern = _split_glob(located)
    filesystem, folder = _filesystem(base + query)
    try:
        info = filesystem.get_file_info(folder)
    except Exception as err:  # noqa: BLE001 - credentials, a bucket that is not there
        raise DataError(f"{where}: cannot open {source}: {first_line(err)}") from None
    if info.type == fs.FileType.NotFound:
        raise DataError(f"{where}: no such folder for the pattern {source}: {base}" if pattern
                        else f"{where}: file not found: {source}")
    if pattern is None and info.type == fs.FileType.File:
        infos = [info]
    elif pattern is None and (ds.format == "hf_disk" or _is_hf_disk(filesystem, folder)):
        return [Shard(source, "hf_disk")]
    else:
        try:
            listed = filesystem.get_file_info(fs.FileSelector(folder, recursive=True))
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{where}: cannot list {base}: {first_line(err)}") from None
        infos = [i for i in listed if i.type == fs.FileType.File and not _skipped(i.path)
                 and (pattern is None or _matches(i.path, folder, pattern))]
    shards = []
    for i in sorted(infos, key=lambda i: i.path):
        path = _uri_of(base, i.path) + query
        fmt, codec = shard_format(i.path, ds.format)
        if fmt is None:
            shard = "" if path == source else f"shard {path!r} in "
            raise DataError(f"{where}: cannot tell the format of {shard}{source!r}; set "
                            f"format to one of {', '.join(DATA_FORMATS)}")
        if fmt == "hf_disk":
            raise DataError(f"{where}: format hf_disk needs a save_to_disk folder, not the "
                            f"file {path}")
        shards.append(Shard(path, fmt, codec, int(i.size or 0), int(i.mtime_ns or 0)))
    if not shards:
        what = f"no files match {source}" if pattern else f"no data files in the folder {source}"
        raise DataError(f"{where}: {what}")
    return shards
