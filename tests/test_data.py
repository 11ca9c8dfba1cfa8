"""Data sources, row kinds and tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from untrac_ray.inputs.data import load_dataset_rows
from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec
from untrac_ray.inputs.token_store import tokenized_dataset
from untrac_ray.inputs.tokenization import (
    IGNORE_INDEX,
    byte_level_tokenizer,
    tokenize_rows,
)

ROWS = [{"prompt": f"q{i}", "target": str(i), "dataset": "a" if i % 2 else "b"}
        for i in range(10)]


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    table = pa.Table.from_pylist(ROWS)
    paths = {
        "csv": tmp_path / "rows.csv",
        "jsonl": tmp_path / "rows.jsonl",
        "parquet": tmp_path / "rows.parquet",
        "hf_disk": tmp_path / "rows_hf",
    }
    paths["csv"].write_text(
        "prompt,target,dataset\n" + "".join(f"{r['prompt']},{r['target']},{r['dataset']}\n"
                                            for r in ROWS)
    )
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(table, paths["parquet"])
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(paths["hf_disk"]))
    return paths


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "hf_disk"])
def test_every_source_format_reads_the_same_rows(sources, fmt):
    rows = load_dataset_rows(DatasetSpec(name="x", source=str(sources[fmt]), subset="a"))
    assert rows.column_names == ["prompt", "target"]
    assert rows.column("target").to_pylist() == ["1", "3", "5", "7", "9"]


def test_max_rows_cuts_a_set_after_its_subset(sources):
    rows = load_dataset_rows(DatasetSpec(name="x", source=str(sources["csv"]), subset="a",
                                         max_rows=2))
    assert rows.column("target").to_pylist() == ["1", "3"]
    whole = load_dataset_rows(DatasetSpec(name="x", source=str(sources["csv"]), max_rows=99))
    assert whole.num_rows == len(ROWS)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="dataset 'x': file not found"):
        load_dataset_rows(DatasetSpec(name="x", source=str(tmp_path / "none.csv")))


def test_missing_column(sources):
    spec = DatasetSpec(name="x", source=str(sources["csv"]), target_column="answer")
    with pytest.raises(DataError, match="column 'answer' not found .*columns: prompt, target"):
        load_dataset_rows(spec)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.csv").write_text("prompt,target\n")
    with pytest.raises(DataError, match="dataset 'x': no rows"):
        load_dataset_rows(DatasetSpec(name="x", source=str(tmp_path / "empty.csv")))


def test_subset_that_does_not_exist_lists_the_names(sources):
    spec = DatasetSpec(name="toxic", source=str(sources["csv"]), subset="c")
    with pytest.raises(DataError, match=r"no rows with dataset == 'c' .*available: a, b"):
        load_dataset_rows(spec)


def test_prompt_target_loss_only_on_target():
    tok = byte_level_tokenizer()
    ds = DatasetSpec(name="x", source="unused.csv")
    rows = pa.table({"prompt": ["What comes after 7?"], "target": ["8"]})
    data = tokenize_rows(ds, rows, tok, TokenizerSpec(max_length=64))
    ids, labels = data.row_ids(0).tolist(), data.batch([0])["labels"][0].tolist()
    taken = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(taken[:-1]) == "8" and taken[-1] == tok.eos_token_id
    assert tok.decode(ids[1 : -len(taken)]) == "What comes after 7?\n"


def test_text_rows_are_packed_into_blocks():
    tok = byte_level_tokenizer()
    ds = DatasetSpec(name="x", source="unused.csv", kind="text")
    rows = pa.table({"text": ["a" * 50, "b" * 50, "c" * 50]})
    data = tokenize_rows(ds, rows, tok, TokenizerSpec(block_size=32))
    assert list(data.offsets) == [0, 32, 64, 96, 128]  # 153 ids: the partial block dropped
    assert data.labels is data.input_ids


def test_tokenized_cache_and_batches(sources, tmp_path):
    tok = byte_level_tokenizer()
    ds = DatasetSpec(name="x", source=str(sources["parquet"]))
    first = tokenized_dataset(ds, tok, TokenizerSpec(), str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "tokenized").glob("x-*"))) == 1
    again = tokenized_dataset(ds, tok, TokenizerSpec(), str(tmp_path / "cache"))
    assert again == first
    data = first.open(tok.pad_token_id)
    batch = data.batch([0, 9])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert len(data) == 10


def test_hf_disk_without_the_datasets_package_says_which_extra_to_install(sources, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"^dataset 'x': format hf_disk needs .*untrac-ray\[hf\]"):
        load_dataset_rows(DatasetSpec(name="x", source=str(sources["hf_disk"]), subset="a"))
