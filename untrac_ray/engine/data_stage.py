"""The data stage on the cluster: tokenizing with Ray Data, and sharing the sets with actors.

`tokenize_on_cluster` reads a dataset's read units (inputs/data.py `read_plan`) in parallel
on the cluster's CPUs: one Ray Data execution per set, a block per unit, whose task reads the
unit as a stream of record batches and returns each batch tokenized (tokenization.encode_batch)
as raw NumPy bytes. A set at a local path is read on the driver's node (when it has CPUs): the
file may be nowhere else; a URI, anywhere. The driver takes the results in corpus order
(preserve_order) and appends them to the set's cache folder as they come
(token_store.SetWriter): its memory holds a few batches, never the corpus. The same code runs
on an embedded Ray and on a cluster.

`share_sets` decides how actors read the sets: from the cache folder, memory-mapped, where
they share the driver's filesystem (one host, no autoscaler); else the driver also puts each
set's arrays into the object store once, and the descriptor carries the reference.
`open_shared` is the actor's side: the folder when it holds the same content, else the arrays.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import ray
from transformers import PreTrainedTokenizerBase

from untrac_ray.inputs.data import plan_rows, read_plan, read_unit
from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.spec_sections import DatasetSpec, ResourcesSpec, TokenizerSpec, is_uri
from untrac_ray.inputs.token_store import StoredSet, find_cached, set_folder, write_set
from untrac_ray.inputs.tokenization import Piece, TokenizedSet, encode_batch, token_dtype

BLOCK_BYTES = 4 * 2**20
# progress(rows_done, rows_total or None, tokens_done) of the set being tokenized
Progress = Callable[[int, "int | None", int], None]


def _to_row(piece: Piece) -> dict[str, list]:
    """A piece as a one-row batch of bytes (ids, lengths, loss_start) and its row count."""
    empty = b""
    return {
        "ids": [piece.ids.tobytes()],
        "lengths": [empty if piece.lengths is None else piece.lengths.tobytes()],
        "loss_start": [empty if piece.loss_start is None else piece.loss_start.tobytes()],
        "rows": [piece.rows],
    }


def _from_row(batch: dict[str, np.ndarray], i: int, dtype: np.dtype, kind: str) -> Piece:
    ids = np.frombuffer(batch["ids"][i], dtype=dtype)
    if kind == "text":
        return Piece(ids, int(batch["rows"][i]))
    return Piece(ids, int(batch["rows"][i]), np.frombuffer(batch["lengths"][i], np.int64),
                 np.frombuffer(batch["loss_start"][i], np.int32))


@contextlib.contextmanager
def _quiet_ordered_data() -> Iterator[None]:
    """Ray Data in corpus order (preserve_order), in small blocks, without progress bars or
    execution logs."""
    ctx = ray.data.DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in (
        "enable_progress_bars", "print_on_execution_start", "verbose_stats_logs",
        "enable_auto_log_stats", "target_max_block_size")}
    order = ctx.execution_options.preserve_order
    logger = logging.getLogger("ray.data")  # "execution finished in ..." lines per set
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # a failed task comes back as an exception, said once
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = ctx.enable_auto_log_stats = False
    ctx.execution_options.preserve_order = True
    # Blocks of about a record batch's tokens, not Ray Data's 128 MiB: the driver holds a few
    # blocks at a time, so they bound its memory.
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.execution_options.preserve_order = order
        logger.setLevel(level)


def _where_readable(ds: DatasetSpec) -> dict:
    """Ray Data's placement of a set's read tasks: anywhere for a URI; for a local path, on
    the driver's node (the one that surely sees the file) when that node has CPUs to run
    them, else anywhere (the path must then be on a filesystem every node shares)."""
    if is_uri(ds.source):
        return {}
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here), {})
    if node.get("Resources", {}).get("CPU", 0) < 1:
        return {}
    return {"label_selector": {"ray.io/node-id": here}}  # every node's own label


def tokenize_on_cluster(
    ds: DatasetSpec, tok: PreTrainedTokenizerBase, spec: TokenizerSpec, cache_dir: str | None,
    progress: Progress | None = None, *, units: list | None = None, read=read_unit,
) -> StoredSet:
    """A set from the cache, else tokenized with Ray Data (module docstring) and cached.
    `units` and `read` are the read plan and its reader (default: inputs/data.py's)."""
    folder = set_folder(ds, tok, spec, cache_dir)
    found = find_cached(ds.name, folder)
    if found is not None:
        return found
    units = read_plan(ds) if units is None else units
    total = plan_rows(units)
    dtype = token_dtype(tok)

    def encode_unit(batch: dict[str, np.ndarray]) -> Iterator[dict[str, list]]:
        for index in batch["unit"]:
            for records in read(ds, units[int(index)]):
                yield _to_row(encode_batch(ds, records, tok, spec, dtype))

    with _quiet_ordered_data():
        out = ray.data.from_items([{"unit": i} for i in range(len(units))],
                                  override_num_blocks=len(units))
        out = out.map_batches(encode_unit, batch_size=1, batch_format="numpy", num_cpus=1,
                              **_where_readable(ds))

        def pieces() -> Iterator[Piece]:
            try:
                for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                    for i in range(len(batch["rows"])):
                        yield _from_row(batch, i, dtype, ds.kind)
            except Exception as err:  # a reader's DataError (a missing column, say): its line
                found = _data_error(err)
                if found is None:
                    raise
                raise DataError(str(found).strip().splitlines()[0]) from None

        def on_piece(rows: int, tokens: int) -> None:
            if progress is not None:
                progress(rows, total, tokens)

        return write_set(ds, spec, dtype, folder, pieces(), on_piece)


def _data_error(err: BaseException) -> DataError | None:
    """The DataError a Ray Data task raised, found in the exceptions wrapping it."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError) and not isinstance(e, ray.exceptions.RayTaskError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def needs_object_store(resources: ResourcesSpec) -> bool:
    """Whether actors may run where the driver's cache folder is not: a node on another host
    than the driver's, or an autoscaler that may add one."""
    if resources.autoscale:
        return True
    here = ray.util.get_node_ip_address()
    return any(n.get("Alive") and n.get("NodeManagerAddress") != here for n in ray.nodes())


def share_sets(sets: dict[str, StoredSet], through_store: bool) -> dict[str, StoredSet]:
    """Descriptors for the actors; with `through_store`, each also refers to its arrays put
    into the object store once (read from the memory map)."""
    if not through_store:
        return {name: s.without_ref() for name, s in sets.items()}
    return {name: replace(s, arrays=ray.put({k: np.asarray(v) for k, v in
                                             s.read_arrays().items()}))
            for name, s in sets.items()}


def open_shared(stored: StoredSet, pad_id: int) -> TokenizedSet:
    """An actor's view of a shared set: its folder memory-mapped when this node sees it with
    the same content, else its arrays from the object store (zero-copy on the node)."""
    if stored.folder_matches():
        return stored.open(pad_id)
    if stored.arrays is None:
        raise DataError(f"dataset {stored.name!r}: its tokenized cache {stored.folder} is not "
                        "on this node and was not put into the object store")
    return stored.open(pad_id, ray.get(stored.arrays))
