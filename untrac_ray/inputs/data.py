"""Reading a dataset's rows: the one way a corpus is read, as a stream of record batches of
string columns (only those its row kind needs), never a whole file at once.

A dataset's source is a list of shards (sources.py). `read_plan` cuts it into read units
(a shard, or a range of a Parquet shard's row groups) from metadata only, choosing the rows a
`sample_rows` sample keeps or the first `max_rows`; `read_unit` streams one unit's rows, and
the units in plan order give the set's rows in corpus order (shards sorted by path, rows in
file order). Tokenization maps `read_unit` over the units in parallel (tokenization.py);
`load_dataset_rows` reads them all into one table, for small sets and tests.

The sample: `sample_rows: N` draws N distinct row numbers uniformly from all the set's rows
(after `subset`), seeded by `sample_seed`, from the rows each shard holds: Parquet's footers
give them without reading a row; JSON Lines and CSV shards are counted by one pass over their
(decompressed) bytes, without parsing. Only the units holding sampled rows are read, only the
row groups holding them in Parquet, and in JSON Lines only the sampled lines are parsed.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.sources import Shard, first_line, list_shards, open_filesystem
from untrac_ray.inputs.spec_sections import DatasetSpec

BATCH_ROWS = 4096  # rows per record batch a unit yields
UNIT_ROWS = 65_536  # a Parquet shard is cut into units of about this many rows (row groups)
CHUNK_BYTES = 8 * 2**20  # JSON Lines are parsed this many (decompressed) bytes at a time
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 13, 32]] = True


@dataclass(frozen=True, eq=False)
class ReadUnit:
    """One piece of a set's rows that one task reads: a shard, or some of a Parquet shard's
    row groups; `rows` (sorted positions among the unit's rows after `subset`) keeps a
    sample, `limit` the first rows; `n_rows` is how many it yields when known."""

    shard: Shard
    row_groups: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None
    limit: int | None = None
    n_rows: int | None = None


def required_columns(ds: DatasetSpec) -> list[str]:
    """The columns a dataset's row kind reads."""
    if ds.kind == "text":
        return [ds.text_column]
    return [ds.prompt_column, ds.target_column]


def read_columns(ds: DatasetSpec) -> list[str]:
    return ([ds.subset_column] if ds.subset is not None else []) + required_columns(ds)


def check_columns(ds: DatasetSpec, names: list[str], columns: list[str], where: str) -> None:
    for col in columns:
        if col not in names:
            hint = ""
            if ds.kind == "prompt_target" and ds.text_column in names:
                hint = (f"; a file of plain text (a {ds.text_column!r} column) needs "
                        "`kind: text` on this dataset")
            raise DataError(f"dataset {ds.name!r}: column {col!r} not found in {where} "
                            f"(columns: {', '.join(names)}){hint}")


def shard_label(ds: DatasetSpec, shard: Shard) -> str:
    """How an error names a shard: the source itself, or `shard X`."""
    return shard.path if shard.path == ds.source else f"shard {shard.path}"


# --- Reading one shard as record batches --------------------------------------------------


def _open_stream(shard: Shard):
    filesystem, path = open_filesystem(shard)
    return filesystem.open_input_stream(path, compression=shard.compression)


def _as_strings(ds: DatasetSpec, batch: pa.RecordBatch | pa.Table, columns: list[str],
                where: str) -> pa.RecordBatch:
    check_columns(ds, batch.schema.names, columns, where)
    arrays = []
    for col in columns:
        values = batch.column(col)
        try:
            arrays.append(values.cast(pa.string()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"dataset {ds.name!r}: column {col!r} in {where} holds "
                            f"{values.type} values, not text") from None
    return pa.RecordBatch.from_arrays(
        [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
        names=columns)


def _parquet_batches(ds, shard, columns, row_groups) -> Iterator[pa.RecordBatch]:
    filesystem, path = open_filesystem(shard)
    with filesystem.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        check_columns(ds, pf.schema_arrow.names, columns, shard_label(ds, shard))
        yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=row_groups,
                                   columns=columns, use_threads=False)


def _csv_batches(ds, shard, columns) -> Iterator[pa.RecordBatch]:
    with _open_stream(shard) as f:  # the header first, for a clear missing-column line
        names = pacsv.open_csv(f).schema.names
    check_columns(ds, names, columns, shard_label(ds, shard))
    # Every column as a string: targets such as "513" must not become numbers.
    opts = pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=False,
                                column_types={c: pa.string() for c in columns})
    with _open_stream(shard) as f:
        yield from pacsv.open_csv(f, convert_options=opts)


def _lines(block: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the non-blank lines of `block` (which ends with a newline)."""
    arr = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    plain = arr[np.minimum(starts, len(arr) - 1)] == ord("{")
    if plain.all():  # every line opens an object: the usual JSON Lines, none blank
        return starts, ends
    blank = ~plain
    for i in np.flatnonzero(blank):  # the few lines that do not open with "{" at once
        blank[i] = not block[starts[i] : ends[i]].strip()
    return starts[~blank], ends[~blank]


def _blocks(shard: Shard) -> Iterator[bytes]:
    """A shard's decompressed bytes in blocks of whole lines (each ends with a newline)."""
    carry = b""
    with _open_stream(shard) as f:
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                break
            data = carry + block
            cut = data.rfind(b"\n") + 1
            carry, data = data[cut:], data[:cut]
            if data:
                yield data
    if carry.strip():
        yield carry + b"\n"


def parse_json_lines(block: bytes, columns: list[str]) -> pa.Table:
    """Rows of JSON Lines as a table; a column whose values mix numbers and strings within
    the block (which Arrow's reader refuses) is read line by line instead."""
    try:
        opts = pajson.ReadOptions(block_size=max(len(block) + 1, 1 << 20), use_threads=False)
        return pajson.read_json(pa.BufferReader(block), read_options=opts)
    except pa.ArrowInvalid as err:
        if "changed from" not in str(err) and "straddling" not in str(err):
            raise
    rows = [json.loads(line) for line in block.splitlines() if line.strip()]

    def text(v):
        return v if isinstance(v, str) or v is None else json.dumps(v)

    return pa.table({c: pa.array([text(r.get(c)) for r in rows], pa.string())
                     for c in columns if any(c in r for r in rows)})


def _jsonl_batches(ds, shard, columns, rows: np.ndarray | None) -> Iterator[pa.RecordBatch]:
    seen = 0  # non-blank lines before this block
    for block in _blocks(shard):
        if rows is None:
            table = parse_json_lines(block, columns)
        else:
            starts, ends = _lines(block)
            lo, hi = np.searchsorted(rows, [seen, seen + len(starts)])
            seen += len(starts)
            if lo == hi:
                continue
            picked = rows[lo:hi] - (seen - len(starts))
            table = parse_json_lines(b"\n".join(block[starts[i]:ends[i]] for i in picked) + b"\n",
                                columns)
        yield from table.to_batches(max_chunksize=BATCH_ROWS)


def _hf_disk_table(ds: DatasetSpec) -> pa.Table:
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset {ds.name!r}: format hf_disk needs the Hugging Face "
                        "`datasets` package: pip install 'untrac-ray[hf]'") from None
    loaded = datasets.load_from_disk(ds.source)  # memory-mapped Arrow files: not read here
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"dataset {ds.name!r}: {ds.source} holds several splits "
                        f"({', '.join(loaded)}); point source at one split's folder")
    return loaded.data.table


def _raw_batches(ds: DatasetSpec, unit: ReadUnit, columns: list[str],
                 lines: np.ndarray | None = None) -> Iterator[pa.RecordBatch]:
    """A unit's batches as the file holds them (before subset and selection)."""
    shard = unit.shard
    if shard.format == "parquet":
        yield from _parquet_batches(ds, shard, columns,
                                    list(unit.row_groups) if unit.row_groups else None)
    elif shard.format == "csv":
        yield from _csv_batches(ds, shard, columns)
    elif shard.format == "jsonl":
        yield from _jsonl_batches(ds, shard, columns, lines)
    else:
        table = _hf_disk_table(ds)
        check_columns(ds, table.column_names, columns, ds.source)
        yield from table.select(columns).to_batches(max_chunksize=BATCH_ROWS)


def read_unit(ds: DatasetSpec, unit: ReadUnit) -> Iterator[pa.RecordBatch]:
    """The unit's rows as record batches of the columns its kind needs, as strings: `subset`
    applied, then the sample's rows (or the first `limit`). DataError (one line naming the
    shard) when the shard cannot be read, lacks a column, or has an empty value."""
    columns, needed = read_columns(ds), required_columns(ds)
    where = shard_label(ds, unit.shard)
    rows = np.asarray(unit.rows, dtype=np.int64) if unit.rows is not None else None
    # JSON Lines without a subset skip the lines a sample leaves out before parsing them.
    lines = rows if unit.shard.format == "jsonl" and ds.subset is None else None
    offset, left = 0, unit.limit
    try:
        for raw in _raw_batches(ds, unit, columns, lines):
            batch = _as_strings(ds, raw, columns, where)
            if ds.subset is not None:
                batch = batch.filter(pc.equal(batch.column(0), ds.subset)).select(needed)
            if rows is not None and lines is None:
                lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
                offset += batch.num_rows
                batch = batch.take(pa.array(rows[lo:hi] - (offset - batch.num_rows)))
            if left is not None:
                batch, left = batch.slice(0, left), left - min(left, batch.num_rows)
            for col in needed:
                if batch.column(col).null_count:
                    raise DataError(f"dataset {ds.name!r}: column {col!r} has "
                                    f"{batch.column(col).null_count} empty values in {where}")
            if batch.num_rows:
                yield batch
            if left == 0:
                return
    except Exception as err:  # noqa: BLE001 - any reader error becomes one line naming the shard
        raise shard_error(ds, unit.shard, err) from None


def _format_name(shard: Shard) -> str:
    return shard.format + (f" ({shard.compression})" if shard.compression else "")


# --- Counting and planning ------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _parquet_row_groups(shard: Shard) -> tuple[int, ...]:
    """The row counts of a Parquet shard's row groups (its footer)."""
    filesystem, path = open_filesystem(shard)
    with filesystem.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        return tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))


@lru_cache(maxsize=4096)
def _count_rows(ds_json: str, shard: Shard) -> int:
    """Rows a shard yields for a dataset (after its subset): metadata for Parquet without a
    subset, one pass over the lines for JSON Lines, else a pass reading the columns."""
    ds = DatasetSpec.model_validate_json(ds_json)
    if ds.subset is None:
        if shard.format == "parquet":
            return sum(_parquet_row_groups(shard))
        if shard.format == "jsonl":
            return sum(len(_lines(block)[0]) for block in _blocks(shard))
    unit = ReadUnit(shard)
    return sum(b.num_rows for b in read_unit(ds, unit))


def shard_error(ds: DatasetSpec, shard: Shard, err: BaseException) -> DataError:
    """The one line that names a shard that cannot be read."""
    if isinstance(err, DataError):
        return err
    return DataError(f"dataset {ds.name!r}: cannot read {shard_label(ds, shard)} as "
                     f"{_format_name(shard)}: {first_line(err)}")


def shard_rows(ds: DatasetSpec, shard: Shard) -> int:
    """How many rows (after `subset`) a shard holds (DataError naming it if unreadable)."""
    try:
        return _count_rows(ds.model_dump_json(include=_COUNT_KEYS), shard)
    except Exception as err:  # noqa: BLE001 - any reader error becomes one line
        raise shard_error(ds, shard, err) from None


def _row_groups(ds: DatasetSpec, shard: Shard) -> tuple[int, ...]:
    try:
        return _parquet_row_groups(shard)
    except Exception as err:  # noqa: BLE001
        raise shard_error(ds, shard, err) from None


# The keys that decide which rows a shard yields (a count is reused across the others).
_COUNT_KEYS = {"name", "source", "format", "kind", "subset", "subset_column", "text_column",
               "prompt_column", "target_column"}


def _whole_units(ds: DatasetSpec, shard: Shard) -> list[ReadUnit]:
    """A shard as units: Parquet row groups in runs of about UNIT_ROWS rows, else one."""
    if shard.format != "parquet" or ds.subset is not None:
        return [ReadUnit(shard)]
    units, group, size = [], [], 0
    counts = _row_groups(ds, shard)
    for i, n in enumerate(counts):
        group.append(i)
        size += n
        if size >= UNIT_ROWS or i == len(counts) - 1:
            units.append(ReadUnit(shard, tuple(group), n_rows=size))
            group, size = [], 0
    return units or [ReadUnit(shard, n_rows=0)]


def _sampled_units(ds: DatasetSpec, shard: Shard, local: np.ndarray) -> list[ReadUnit]:
    """The units that read a shard's sampled rows (`local`: sorted positions in it)."""
    if shard.format != "parquet" or ds.subset is not None:
        return [ReadUnit(shard, rows=tuple(local.tolist()), n_rows=len(local))]
    bounds = np.concatenate([[0], np.cumsum(_row_groups(ds, shard))])
    groups = np.unique(np.searchsorted(bounds, local, side="right") - 1)
    # positions among the rows of the groups read: subtract the rows of groups skipped
    skipped = bounds[groups] - np.concatenate([[0], np.cumsum(np.diff(bounds)[groups])[:-1]])
    group_of = np.searchsorted(bounds[groups], local, side="right") - 1
    rows = local - skipped[group_of]
    return [ReadUnit(shard, tuple(groups.tolist()), tuple(rows.tolist()), n_rows=len(local))]


def read_plan(ds: DatasetSpec) -> list[ReadUnit]:
    """The units that read a dataset, in corpus order (DataError, one line, when its source
    or a shard cannot be read, or a subset or sample leaves no rows)."""
    shards = list_shards(ds)
    if ds.sample_rows is None and ds.max_rows is None:
        return [u for s in shards for u in _whole_units(ds, s)]
    if ds.max_rows is not None:
        units, left = [], ds.max_rows
        for shard in shards:
            n = shard_rows(ds, shard)
            if n:
                units.append(ReadUnit(shard, limit=min(n, left), n_rows=min(n, left)))
                left -= min(n, left)
            if not left:
                break
        return _nonempty(ds, units)
    counts = np.array([shard_rows(ds, s) for s in shards], dtype=np.int64)
    total = int(counts.sum())
    if ds.sample_rows >= total:  # the whole set is the sample
        return _nonempty(ds, [u for s, n in zip(shards, counts, strict=True) if n
                              for u in _whole_units(ds, s)])
    rng = np.random.default_rng(ds.sample_seed)
    picked = np.sort(rng.choice(total, size=ds.sample_rows, replace=False))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    units = []
    for i, shard in enumerate(shards):
        lo, hi = np.searchsorted(picked, bounds[i : i + 2])
        if hi > lo:
            units.extend(_sampled_units(ds, shard, picked[lo:hi] - bounds[i]))
    return units


def _nonempty(ds: DatasetSpec, units: list[ReadUnit]) -> list[ReadUnit]:
    if not units or not any(u.n_rows is None or u.n_rows for u in units):  # None: unknown
        what = f" with {ds.subset_column} == {ds.subset!r}" if ds.subset is not None else ""
        raise DataError(f"dataset {ds.name!r}: no rows{what} in {ds.source}")
    return units


def plan_rows(units: list[ReadUnit]) -> int | None:
    """How many rows a plan yields, None when a unit's count is not known before reading."""
    counts = [u.n_rows for u in units]
    return None if any(n is None for n in counts) else int(sum(counts))


def load_dataset_rows(ds: DatasetSpec) -> pa.Table:
    """The dataset's rows as one table of string columns (only those its kind needs)."""
    columns = required_columns(ds)
    batches = [b for unit in read_plan(ds) for b in read_unit(ds, unit)]
    table = pa.Table.from_batches(batches, schema=pa.schema([(c, pa.string()) for c in columns]))
    if table.num_rows == 0:
        if ds.subset is not None:
            refuse_empty_subset(ds)
        raise DataError(f"dataset {ds.name!r}: no rows in {ds.source}")
    return table


def refuse_empty_subset(ds: DatasetSpec) -> None:
    """DataError naming the subset values there are, for a subset that matched no row."""
    plain = ds.model_copy(update={"subset": None, "sample_rows": None, "max_rows": None})
    values: set[str] = set()
    for unit in read_plan(plain):
        for raw in _raw_batches(plain, unit, [ds.subset_column]):
            values.update(v for v in raw.column(0).cast(pa.string()).to_pylist() if v)
    shown = ", ".join(sorted(values)[:20]) + (" ..." if len(values) > 20 else "")
    raise DataError(f"dataset {ds.name!r}: no rows with {ds.subset_column} == {ds.subset!r} "
                    f"in {ds.source} (available: {shown})")


def peek_lines(shard: Shard, n_bytes: int = 1 << 16) -> tuple[bytes, int]:
    """The whole lines in about the first `n_bytes` of a shard's raw (compressed) bytes,
    decompressed, and how many raw bytes they came from (the shard's size when it is read to
    its end). Exact for plain and gzip files; other codecs read ahead by up to 64 KB."""
    filesystem, path = open_filesystem(shard)
    pieces: list[bytes] = []
    with filesystem.open_input_stream(path, compression=None) as raw:
        if shard.compression in (None, "gzip"):
            inflate = zlib.decompressobj(wbits=47) if shard.compression else None
            used = 0
            while used < n_bytes and (block := raw.read(min(1 << 16, n_bytes - used))):
                used += len(block)
                pieces.append(inflate.decompress(block) if inflate else block)
            ended = not raw.read(1)
        else:
            stream = pa.CompressedInputStream(raw, shard.compression)
            while raw.tell() < n_bytes and (piece := stream.read(1 << 16)):
                pieces.append(piece)
            ended, used = raw.tell() >= shard.size, raw.tell()
    text = b"".join(pieces)
    if ended:
        return (text if text.endswith(b"\n") or not text.strip() else text + b"\n"), used
    return text[: text.rfind(b"\n") + 1], used


def shard_header(ds: DatasetSpec, shard: Shard) -> list[str]:
    """A shard's column names, read from its footer or first lines (DataError naming it)."""
    try:
        if shard.format == "parquet":
            filesystem, path = open_filesystem(shard)
            with filesystem.open_input_file(path) as f:
                return pq.read_schema(f).names
        if shard.format == "csv":
            with _open_stream(shard) as f:
                return pacsv.open_csv(f).schema.names
        if shard.format == "jsonl":
            head, _ = peek_lines(shard)
            return parse_json_lines(head, read_columns(ds)).column_names if head.strip() else []
        return _hf_disk_table(ds).column_names
    except Exception as err:  # noqa: BLE001
        raise shard_error(ds, shard, err) from None


def check_dataset_header(ds: DatasetSpec) -> list[Shard]:
    """Cheap checks of a dataset without reading its rows (DataError, one line): its source
    lists to shards whose formats are known, and the columns its kind (and subset) reads are
    in the first shard, and in every local Parquet shard's footer. Returns the shards."""
    shards = list_shards(ds)
    footers = [s for s in shards[1:] if s.format == "parquet" and "://" not in s.path]
    for shard in [shards[0], *footers]:
        check_columns(ds, shard_header(ds, shard), read_columns(ds), shard_label(ds, shard))
    return shards
