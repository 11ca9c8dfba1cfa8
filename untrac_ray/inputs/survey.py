"""How big a dataset is, said in seconds without reading it (`validate`): its shards, its rows
(exact from Parquet footers and Hugging Face folders; estimated for JSON Lines and CSV from the
rows per byte of the first few MB of up to eight shards spread over the set), the rows the job
keeps (`sample_rows`, `max_rows`), and a few thousand rows read from those shards, from which
the caller estimates tokens. `exact` counts every shard's rows (one pass over their bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from untrac_ray.inputs.data import (
    ReadUnit,
    check_columns,
    check_dataset_header,
    parse_json_lines,
    peek_lines,
    read_columns,
    read_unit,
    refuse_empty_subset,
    required_columns,
    shard_error,
    shard_label,
    shard_rows,
)
from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.sources import Shard
from untrac_ray.inputs.spec_sections import DatasetSpec

PEEK_BYTES = 4 * 2**20  # raw bytes read from each shard surveyed
PEEK_SHARDS = 8  # shards surveyed, spread over the set


@dataclass
class SetSurvey:
    """A dataset's size as `validate` tells it."""

    shards: int
    rows: int  # the set's rows (after subset): exact, or estimated
    exact: bool
    kept: int  # the rows the job uses (sample_rows, max_rows, else rows)
    peek: pa.Table  # rows read for a token estimate (required columns, as strings)
    complete: bool  # the peek is every row the job uses


def _spread(shards: list[Shard], k: int) -> list[int]:
    """Up to k shard positions spread evenly over the set (the first and last included)."""
    if len(shards) <= k:
        return list(range(len(shards)))
    return sorted(set(np.linspace(0, len(shards) - 1, k).round().astype(int).tolist()))


def _peek_lines(ds: DatasetSpec, shard: Shard) -> tuple[pa.Table, int, bool]:
    """The rows in a JSON Lines or CSV shard's first PEEK_BYTES (subset column included), the
    raw bytes they came from, and whether that was the whole shard."""
    columns = read_columns(ds)
    try:
        text, used = peek_lines(shard, PEEK_BYTES)
        if shard.format == "csv":
            opts = pacsv.ConvertOptions(strings_can_be_null=False,
                                        column_types={c: pa.string() for c in columns})
            table = pacsv.read_csv(pa.BufferReader(text), convert_options=opts)
        else:
            table = parse_json_lines(text, columns) if text.strip() else pa.table({})
        check_columns(ds, table.column_names, columns, shard_label(ds, shard))
    except Exception as err:  # noqa: BLE001
        raise shard_error(ds, shard, err) from None
    return table.select(columns), used, used >= shard.size


def _subset(ds: DatasetSpec, table: pa.Table) -> pa.Table:
    if ds.subset is not None:
        table = table.filter(pc.equal(table.column(ds.subset_column).cast(pa.string()),
                                      ds.subset))
    return table.select(required_columns(ds))


def survey_dataset(ds: DatasetSpec, rows_to_read: int = 2000, exact: bool = False) -> SetSurvey:
    """A dataset's shards, rows and a peek at them (DataError, one line, for what a run would
    fail on that the survey sees: a missing column, an unreadable shard, an empty set)."""
    shards = check_dataset_header(ds)
    counts = {i: shard_rows(ds, s) for i, s in enumerate(shards)
              if exact or (s.format in ("parquet", "hf_disk") and ds.subset is None)}
    picked = _spread(shards, PEEK_SHARDS)
    each = max(rows_to_read // len(picked), 1)
    peeks: list[pa.Table] = []
    lines = raw = matched = seen = 0
    for i in picked:
        shard = shards[i]
        if i in counts:
            batches = list(read_unit(ds, ReadUnit(shard, limit=each)))
            table = pa.Table.from_batches(batches) if batches else None
        else:
            table, used, whole = _peek_lines(ds, shard)
            n = table.num_rows
            table = _subset(ds, table)
            seen, matched = seen + n, matched + table.num_rows
            if whole:
                counts[i] = table.num_rows
            else:
                lines, raw = lines + n, raw + used
        if table is not None and table.num_rows:
            peeks.append(table.slice(0, each))
    share = matched / seen if ds.subset is not None and seen else 1.0
    per_byte = lines / raw if raw else 0.0
    rows = sum(counts.values()) + int(round(sum(
        s.size * per_byte * share for i, s in enumerate(shards) if i not in counts)))
    known = len(counts) == len(shards)
    if known and rows == 0:
        if ds.subset is not None:
            refuse_empty_subset(ds)
        what = f" with {ds.subset_column} == {ds.subset!r}" if ds.subset is not None else ""
        raise DataError(f"dataset {ds.name!r}: no rows{what} in {ds.source}")
    kept = min(rows, ds.sample_rows or ds.max_rows or rows)
    empty = pa.table({c: pa.array([], pa.string()) for c in required_columns(ds)})
    peek = pa.concat_tables(peeks) if peeks else empty
    return SetSurvey(len(shards), rows, known, kept, peek,
                     complete=known and peek.num_rows == rows == kept)
