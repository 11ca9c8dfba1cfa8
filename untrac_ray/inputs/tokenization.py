"""Tokenizers, the packing of rows into token rows, and the tokenized sets' torch-side view.

Rows become token ids once per job (token_store.py keeps them on disk; the engine tokenizes
on the cluster's CPUs with Ray Data). Packing is one implementation, `encode_batch` per record
batch and `SetBuilder` over a set's batches in corpus order, used in memory (`tokenize_rows`)
and when writing the cache:

- `text` rows are tokenized, each followed by an end-of-text token, as one stream of ids cut
  into fixed-length blocks, as for pretraining (the partial last block dropped, unless the set
  has no full block: then its one short block); every token counts in the loss, so a text
  set stores no labels.
- `prompt_target` rows become `<bos> prompt separator target <eos>` with the loss on the target
  tokens (and the closing eos) only: a row stores `loss_start`, its number of leading tokens
  without a loss, not a label array.

Ids are kept in the smallest dtype that holds the vocabulary (uint16 up to 65,536 ids).
`TokenizedSet` is the torch-side view: flat ids plus offsets (a memory map of the cache, or
arrays), batched on demand into int64 input_ids / attention_mask / labels.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from untrac_ray.inputs.data import refuse_empty_subset
from untrac_ray.inputs.errors import DataError, SpecError
from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec

IGNORE_INDEX = -100
SEPARATOR = "\n"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>), built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tok.add_special_tokens([eos])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos, unk_token=eos
    )


def load_tokenizer(spec: TokenizerSpec, model_path: str | None = None) -> PreTrainedTokenizerBase:
    """The job's tokenizer: byte-level, or a local folder (default: the model's folder)."""
    if spec.kind == "byte":
        return byte_level_tokenizer()
    path = spec.path or model_path
    if not path or not Path(path).is_dir():
        raise SpecError(f"tokenizer.path: tokenizer folder not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise SpecError(f"tokenizer.path: cannot load a tokenizer from {path}: {err}") from None
    if tok.eos_token_id is None:
        raise SpecError(f"tokenizer.path: tokenizer in {path} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def token_dtype(tok: PreTrainedTokenizerBase) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the tokenizer."""
    return np.dtype(np.uint16 if len(tok) <= 2**16 else np.uint32)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's content (not its name or size): a fast tokenizer's serialized
    tokenizer.json, else its vocabulary files and vocabulary; with the special ids."""
    digest = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        folder = Path(str(tok.name_or_path))
        for fname in sorted(getattr(tok, "vocab_files_names", {}).values()):
            if (folder / fname).is_file():
                digest.update(fname.encode() + (folder / fname).read_bytes())
        digest.update(json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1])).encode())
    digest.update(json.dumps([type(tok).__name__, len(tok), tok.bos_token_id, tok.eos_token_id,
                              tok.pad_token_id]).encode())
    return digest.hexdigest()[:16]


def _encode(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each text's ids, no special tokens: a fast tokenizer's Rust backend called directly,
    without the character offsets `tok(texts)` computes and drops (the same ids, 5-10%
    faster); any other tokenizer through `tok(texts)`."""
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None) if tok.is_fast else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


@dataclass
class Piece:
    """The token rows of one record batch: flat ids, and for prompt_target rows each row's
    length and loss_start (text: a stream of ids, each row followed by eos)."""

    ids: np.ndarray
    rows: int  # source rows it came from
    lengths: np.ndarray | None = None
    loss_start: np.ndarray | None = None


def _flat(lists: list[list[int]], lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype,
                       count=int(lengths.sum()))


def encode_batch(ds: DatasetSpec, batch: pa.RecordBatch | pa.Table, tok: PreTrainedTokenizerBase,
                 spec: TokenizerSpec, dtype: np.dtype | None = None) -> Piece:
    """Tokenize one record batch of a dataset's rows (packing rules: module docstring)."""
    dtype = dtype or token_dtype(tok)
    eos = tok.eos_token_id
    if ds.kind == "text":
        enc = _encode(tok, batch.column(ds.text_column).to_pylist())
        lengths = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
        flat = _flat(enc, lengths, dtype)
        return Piece(np.insert(flat, np.cumsum(lengths), eos).astype(dtype, copy=False),
                     len(enc))
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    prompts = _encode(tok, [p + SEPARATOR for p in batch.column(ds.prompt_column).to_pylist()])
    targets = _encode(tok, batch.column(ds.target_column).to_pylist())
    rows, loss_start = [], []
    for p, t in zip(prompts, targets, strict=True):
        t = (t + [eos])[: spec.max_length - 1]
        p = ([bos] + p)[-(spec.max_length - len(t)) :] if spec.max_length > len(t) else []
        rows.append(p + t)
        loss_start.append(len(p))
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return Piece(_flat(rows, lengths, dtype), len(rows), lengths,
                 np.asarray(loss_start, dtype=np.int32))


def text_offsets(tokens: int, block_size: int) -> np.ndarray:
    """Row offsets of a text set's blocks in its stream of `tokens` ids: full blocks only, or
    one short block when the set has no full block."""
    n_full = tokens // block_size
    if n_full:
        return np.arange(n_full + 1, dtype=np.int64) * block_size
    return np.asarray([0, tokens], dtype=np.int64)


class SetBuilder:
    """A set's pieces, in corpus order, packed: ids go to `sink` (a binary file) or are kept
    in memory; `finish` gives the layout (meta and the per-row arrays) and a content hash."""

    def __init__(self, ds: DatasetSpec, spec: TokenizerSpec, dtype: np.dtype, sink=None) -> None:
        self.ds, self.spec, self.dtype, self.sink = ds, spec, np.dtype(dtype), sink
        self.chunks: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.loss_start: list[np.ndarray] = []
        self.tokens = self.source_rows = 0
        self.digest = hashlib.blake2b(digest_size=8)

    def add(self, piece: Piece) -> None:
        ids = np.ascontiguousarray(piece.ids, dtype=self.dtype)
        self.digest.update(memoryview(ids).cast("B"))
        if self.sink is not None:
            self.sink.write(memoryview(ids).cast("B"))
        else:
            self.chunks.append(ids)
        self.tokens += len(ids)
        self.source_rows += piece.rows
        if piece.lengths is not None:
            self.lengths.append(np.asarray(piece.lengths, dtype=np.int64))
            self.loss_start.append(np.asarray(piece.loss_start, dtype=np.int32))

    def finish(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(meta, arrays): arrays holds offsets and loss_start of prompt_target rows (and the
        ids when kept in memory). Raises DataError when the set had no rows (a subset that
        matched none names the values there are) or no token carries a loss."""
        if self.source_rows == 0:
            if self.ds.subset is not None:
                refuse_empty_subset(self.ds)
            raise DataError(f"dataset {self.ds.name!r}: no rows in {self.ds.source}")
        arrays: dict[str, np.ndarray] = {}
        meta = {"kind": self.ds.kind, "dtype": self.dtype.name, "tokens": self.tokens,
                "source_rows": self.source_rows}
        if self.ds.kind == "text":
            meta["block_size"] = self.spec.block_size
            meta["rows"] = len(text_offsets(self.tokens, self.spec.block_size)) - 1
            empty = self.tokens == 0
        else:
            lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
            arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            arrays["loss_start"] = (np.concatenate(self.loss_start) if self.loss_start
                                    else np.zeros(0, np.int32))
            meta["rows"] = len(lengths)
            empty = not bool((lengths > arrays["loss_start"]).any())
        if empty:
            raise DataError(f"dataset {self.ds.name!r}: no tokens to compute a loss on")
        for name in ("offsets", "loss_start"):
            if name in arrays:
                self.digest.update(name.encode() + arrays[name].tobytes())
        self.digest.update(json.dumps(meta, sort_keys=True).encode())
        meta["content_hash"] = self.digest.hexdigest()
        if self.sink is None:
            arrays["ids"] = (np.concatenate(self.chunks) if self.chunks
                             else np.zeros(0, self.dtype))
        return meta, arrays


def tokenize_rows(
    ds: DatasetSpec, rows: pa.Table, tok: PreTrainedTokenizerBase, spec: TokenizerSpec
) -> TokenizedSet:
    """A table of rows tokenized in memory (the same packing as the cache's)."""
    builder = SetBuilder(ds, spec, token_dtype(tok))
    for batch in rows.to_batches(max_chunksize=1024):
        builder.add(encode_batch(ds, batch, tok, spec, builder.dtype))
    meta, arrays = builder.finish()
    return TokenizedSet.from_arrays(ds.name, meta, arrays, tok.pad_token_id)


@dataclass
class TokenizedSet:
    """Token rows of one dataset as flat arrays, turned into padded torch batches on demand."""

    name: str
    input_ids: np.ndarray  # flat ids of all rows (uint16/uint32; possibly a memory map)
    offsets: np.ndarray  # int64: row i spans offsets[i]:offsets[i+1]
    pad_id: int
    loss_start: np.ndarray | None = None  # per row, leading tokens without a loss; None: none
    stream_tokens: int | None = None  # a text set: its whole stream (the blocks cut from it)

    @classmethod
    def from_arrays(cls, name: str, meta: dict, arrays: dict[str, np.ndarray], pad_id: int
                    ) -> TokenizedSet:
        """The view of a set's stored arrays (ids, and offsets/loss_start of prompt rows)."""
        ids = arrays["ids"]
        if meta["kind"] == "text":
            offsets = text_offsets(meta["tokens"], meta["block_size"])
            return cls(name, ids[: offsets[-1]], offsets, pad_id, None, meta["tokens"])
        return cls(name, ids, np.asarray(arrays["offsets"], dtype=np.int64), pad_id,
                   np.asarray(arrays["loss_start"]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def labels(self) -> np.ndarray:
        """Flat labels: the ids, IGNORE_INDEX on each row's first loss_start tokens (built on
        demand for prompt rows; a text set's labels are its ids)."""
        if self.loss_start is None:
            return self.input_ids
        labels = np.asarray(self.input_ids, dtype=np.int64).copy()
        edges = np.zeros(len(labels) + 1, dtype=np.int64)
        np.add.at(edges, self.offsets[:-1], 1)
        np.add.at(edges, self.offsets[:-1] + self.loss_start, -1)
        labels[np.cumsum(edges)[:-1] > 0] = IGNORE_INDEX
        return labels

    def row_ids(self, row: int) -> np.ndarray:
        return np.asarray(self.input_ids[self.offsets[row] : self.offsets[row + 1]])

    def batch(self, indices: np.ndarray | list[int], device: torch.device | str = "cpu"):
        """A right-padded batch: input_ids, attention_mask and labels (-100 on padding)."""
        rows = np.asarray(indices)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        width = int((ends - starts).max())
        n = len(starts)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            ids[i, : e - s] = self.input_ids[s:e]
            first = 0 if self.loss_start is None else int(self.loss_start[rows[i]])
            labels[i, first : e - s] = ids[i, first : e - s]
            mask[i, : e - s] = 1
        return {
            "input_ids": torch.from_numpy(ids).to(device),
            "attention_mask": torch.from_numpy(mask).to(device),
            "labels": torch.from_numpy(labels).to(device),
        }
