"""Reading datasets from their sources into Arrow tables of strings, with clear errors.

Sources: CSV, JSON Lines, Parquet (local paths or URIs that pyarrow's filesystems open), or a
folder written by `datasets.Dataset.save_to_disk`. A `subset` keeps the rows of one named
dataset out of a file that holds several (a `dataset` column, by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.spec_sections import DatasetSpec, is_uri


def _open_input(source: str):
    """A readable file for a local path or a remote URI."""
    if is_uri(source):
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(source)
        return filesystem.open_input_file(path)
    return source


def _read_source(ds: DatasetSpec) -> pa.Table:
    try:
        fmt = ds.resolved_format()
    except ValueError as err:
        raise DataError(f"dataset {ds.name!r}: {err}") from None
    if not is_uri(ds.source) and not Path(ds.source).exists():
        raise DataError(f"dataset {ds.name!r}: file not found: {ds.source}")
    try:
        if fmt == "csv":
            # Read every column as a string: targets such as "513" must not become numbers.
            names = pacsv.read_csv(_open_input(ds.source)).column_names
            opts = pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False
            )
            return pacsv.read_csv(_open_input(ds.source), convert_options=opts)
        if fmt == "jsonl":
            return pajson.read_json(_open_input(ds.source))
        if fmt == "parquet":
            return pq.read_table(_open_input(ds.source))
        try:
            import datasets
        except ImportError:
            raise DataError(f"dataset {ds.name!r}: format hf_disk needs the Hugging Face "
                            "`datasets` package: pip install 'untrac-ray[hf]'") from None
        loaded = datasets.load_from_disk(ds.source)
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(
                f"dataset {ds.name!r}: {ds.source} holds several splits "
                f"({', '.join(loaded)}); point source at one split's folder"
            )
        return loaded.data.table
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader error becomes one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset {ds.name!r}: cannot read {ds.source} as {fmt}: {first}") from None


def required_columns(ds: DatasetSpec) -> list[str]:
    """The columns a dataset's row kind reads."""
    if ds.kind == "text":
        return [ds.text_column]
    return [ds.prompt_column, ds.target_column]


def _check_columns(ds: DatasetSpec, table: pa.Table | list[str], columns: list[str]) -> None:
    names = table if isinstance(table, list) else table.column_names
    for col in columns:
        if col not in names:
            hint = ""
            if ds.kind == "prompt_target" and ds.text_column in names:
                hint = (f"; a file of plain text (a {ds.text_column!r} column) needs "
                        "`kind: text` on this dataset")
            raise DataError(
                f"dataset {ds.name!r}: column {col!r} not found in {ds.source} "
                f"(columns: {', '.join(names)}){hint}"
            )


def check_dataset_header(ds: DatasetSpec) -> None:
    """Cheap checks of a dataset (at a URI or a local path) without reading its rows (raise
    DataError).

    The file (or folder) must exist; the columns are checked where a header is cheap to read:
    a Parquet file's footer, a CSV file's first block. Rows (empty sets, subsets) are not
    read here: that needs the whole file, which `load_dataset_rows` reads when the job runs.
    """
    from pyarrow import fs

    try:
        fmt = ds.resolved_format()
    except ValueError as err:
        raise DataError(f"dataset {ds.name!r}: {err}") from None
    try:
        filesystem, path = fs.FileSystem.from_uri(ds.source)
        info = filesystem.get_file_info(path)
    except Exception as err:  # noqa: BLE001 - an unknown scheme, missing credentials, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset {ds.name!r}: cannot open {ds.source}: {first}") from None
    if info.type == fs.FileType.NotFound:
        raise DataError(f"dataset {ds.name!r}: file not found: {ds.source}")
    if fmt not in ("parquet", "csv") or info.type != fs.FileType.File:
        return
    try:
        if fmt == "parquet":
            with filesystem.open_input_file(path) as f:
                names = pq.read_schema(f).names
        else:
            with filesystem.open_input_stream(path) as f:
                names = pacsv.open_csv(f).schema.names
    except Exception as err:  # noqa: BLE001 - any reader error becomes one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset {ds.name!r}: cannot read {ds.source} as {fmt}: {first}") from None
    needed = ([ds.subset_column] if ds.subset is not None else []) + required_columns(ds)
    _check_columns(ds, names, needed)


def load_dataset_rows(ds: DatasetSpec) -> pa.Table:
    """The dataset's rows as a table of string columns (only the columns its kind needs)."""
    table = _read_source(ds)
    if ds.subset is not None:
        _check_columns(ds, table, [ds.subset_column])
        col = table.column(ds.subset_column).cast(pa.string())
        mask = pc.equal(col, ds.subset)
        if not pc.any(mask).as_py():
            available = sorted(v for v in pc.unique(col).to_pylist() if v is not None)
            shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
            raise DataError(
                f"dataset {ds.name!r}: no rows with {ds.subset_column} == {ds.subset!r} in "
                f"{ds.source} (available: {shown})"
            )
        table = table.filter(mask)
    columns = required_columns(ds)
    _check_columns(ds, table, columns)
    table = table.select(columns)
    if table.num_rows == 0:
        raise DataError(f"dataset {ds.name!r}: no rows in {ds.source}")
    if ds.max_rows is not None:
        table = table.slice(0, ds.max_rows)
    out = {}
    for col in columns:
        values = table.column(col)
        if values.null_count:
            raise DataError(
                f"dataset {ds.name!r}: column {col!r} has {values.null_count} empty values"
            )
        out[col] = values.cast(pa.string())
    return pa.table(out)


# The reading interface the tokenizer uses (a plan of read units, each read as a stream of
# record batches). In this form one unit covers the whole source; a streaming reader of
# shards replaces these four functions.

@dataclass(frozen=True)
class ReadUnit:
    """One piece of a dataset's source read on its own (here: the whole source)."""

    source: str
    index: int = 0


def read_plan(ds: DatasetSpec) -> list[ReadUnit]:
    """The read units of a dataset, in corpus order (metadata only)."""
    return [ReadUnit(ds.source)]


def read_unit(ds: DatasetSpec, unit: ReadUnit) -> Iterator[pa.RecordBatch]:
    """A unit's rows (the string columns the dataset's kind reads), as record batches."""
    yield from load_dataset_rows(ds).to_batches(max_chunksize=1024)


def source_fingerprint(ds: DatasetSpec) -> str:
    """A fingerprint of the dataset's source (changes when its files do)."""
    from untrac_ray.inputs.fingerprints import file_fingerprint

    return file_fingerprint(ds.source)


def plan_rows(units: list[ReadUnit]) -> int | None:
    """The rows a plan yields, where known without reading them (here: not known)."""
    return None
