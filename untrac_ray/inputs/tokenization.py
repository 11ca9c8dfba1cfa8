"""Tokenizers and tokenized datasets.

Rows become token ids once per job on the driver and are kept as Arrow tables (cached on disk,
shared with actors through the object store):

- `text` rows are tokenized, joined with an end-of-text token and packed into fixed-length
  blocks, as for pretraining; every token counts in the loss.
- `prompt_target` rows become `<bos> prompt separator target <eos>` with the loss on the target
  tokens (and the closing eos) only.

`TokenizedSet` is the torch-side view: flat arrays plus offsets, batched on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from untrac_ray.inputs.data import load_dataset_rows
from untrac_ray.inputs.errors import DataError, SpecError
from untrac_ray.inputs.fingerprints import file_fingerprint, spec_hash
from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec

IGNORE_INDEX = -100
SEPARATOR = "\n"
_TOKENIZED_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
)


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


def _encode(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tok(texts, add_special_tokens=False)["input_ids"]


def tokenize_rows(
    ds: DatasetSpec, rows: pa.Table, tok: PreTrainedTokenizerBase, spec: TokenizerSpec
) -> pa.Table:
    """Token ids and labels (IGNORE_INDEX where no loss is taken) for a table of rows."""
    eos = tok.eos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    inputs: list[list[int]] = []
    labels: list[list[int]] = []
    if ds.kind == "text":
        stream: list[int] = []
        for ids in _encode(tok, rows.column(ds.text_column).to_pylist()):
            stream.extend(ids)
            stream.append(eos)
        size = spec.block_size
        # Keep a short final block only when the set has no full block at all.
        n_full = len(stream) // size
        starts = range(0, n_full * size, size) if n_full else [0]
        for s in starts:
            block = stream[s : s + size]
            inputs.append(block)
            labels.append(block)
    else:
        prompts = _encode(tok, [p + SEPARATOR for p in rows.column(ds.prompt_column).to_pylist()])
        targets = _encode(tok, rows.column(ds.target_column).to_pylist())
        for p, t in zip(prompts, targets, strict=True):
            t = (t + [eos])[: spec.max_length - 1]
            p = ([bos] + p)[-(spec.max_length - len(t)) :] if spec.max_length > len(t) else []
            inputs.append(p + t)
            labels.append([IGNORE_INDEX] * len(p) + t)
    if not inputs or all(all(x == IGNORE_INDEX for x in lab) for lab in labels):
        raise DataError(f"dataset {ds.name!r}: no tokens to compute a loss on")
    return pa.table({"input_ids": inputs, "labels": labels}, schema=_TOKENIZED_SCHEMA)


def tokenized_dataset(
    ds: DatasetSpec, tok: PreTrainedTokenizerBase, spec: TokenizerSpec, cache_dir: str | None
) -> pa.Table:
    """Load and tokenize a dataset, reusing the Arrow file cached for the same inputs."""
    key = spec_hash(
        ds.model_dump(), file_fingerprint(ds.source), spec.model_dump(),
        tok.name_or_path, len(tok), SEPARATOR,
    )
    path = Path(cache_dir, "tokenized", f"{ds.name}-{key}.arrow") if cache_dir else None
    if path is not None and path.exists():
        return feather.read_table(path, memory_map=True)
    table = tokenize_rows(ds, load_dataset_rows(ds), tok, spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        feather.write_feather(table, tmp, compression="uncompressed")
        tmp.replace(path)
    return table


@dataclass
class TokenizedSet:
    """Token rows of one dataset as flat arrays, turned into padded torch batches on demand."""

    name: str
    input_ids: np.ndarray  # flat int32 values of all rows
    labels: np.ndarray
    offsets: np.ndarray  # row i spans offsets[i]:offsets[i+1]
    pad_id: int

    @classmethod
    def from_table(cls, name: str, table: pa.Table, pad_id: int) -> TokenizedSet:
        ids = table.column("input_ids").combine_chunks()
        labels = table.column("labels").combine_chunks()
        if isinstance(ids, pa.ChunkedArray):  # an empty chunked array stays chunked
            ids, labels = ids.chunk(0), labels.chunk(0)
        offsets = np.asarray(ids.offsets, dtype=np.int64)
        base = offsets[0]
        return cls(
            name=name,
            input_ids=np.asarray(ids.values)[base : offsets[-1]],
            labels=np.asarray(labels.values)[base : offsets[-1]],
            offsets=offsets - base,
            pad_id=pad_id,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, indices: np.ndarray | list[int], device: torch.device | str = "cpu"):
        """A right-padded batch: input_ids, attention_mask and labels (-100 on padding)."""
        starts = self.offsets[np.asarray(indices)]
        ends = self.offsets[np.asarray(indices) + 1]
        width = int((ends - starts).max())
        n = len(starts)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for row, (s, e) in enumerate(zip(starts, ends, strict=True)):
            ids[row, : e - s] = self.input_ids[s:e]
            labels[row, : e - s] = self.labels[s:e]
            mask[row, : e - s] = 1
        return {
            "input_ids": torch.from_numpy(ids).to(device),
            "attention_mask": torch.from_numpy(mask).to(device),
            "labels": torch.from_numpy(labels).to(device),
        }
