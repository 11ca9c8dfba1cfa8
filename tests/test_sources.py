"""Corpora as users keep them: a folder of Parquet shards, a glob of gzipped and zstd JSON
Lines shards, one compressed file, a file:// URI, read as one set in corpus order; a seeded
sample that draws from every shard, reads only what holds its rows and is the same for the
same seed whatever the format; a corrupt shard refused in one line naming it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from untrac_ray.inputs import data as data_module
from untrac_ray.inputs.data import (
    check_dataset_header,
    load_dataset_rows,
    plan_rows,
    read_plan,
)
from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.sources import list_shards
from untrac_ray.inputs.spec_sections import DatasetSpec

SHARDS = (700, 1200, 300, 900)  # rows per shard


def rows_of(shard: int, n: int) -> list[str]:
    return [f"shard {shard} row {i}" for i in range(n)]


ALL_ROWS = [r for k, n in enumerate(SHARDS) for r in rows_of(k, n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The same rows as Parquet shards (row groups of 128) and as JSON Lines shards, the
    first three gzipped and the last zstd, with a _SUCCESS marker and a hidden file beside."""
    root = tmp_path_factory.mktemp("corpus")
    parquet, jsonl = root / "parquet", root / "jsonl"
    parquet.mkdir()
    jsonl.mkdir()
    for k, n in enumerate(SHARDS):
        rows = rows_of(k, n)
        pq.write_table(pa.table({"text": rows, "n": list(range(n))}),
                       parquet / f"part-{k:05d}.parquet", row_group_size=128)
        lines = "".join(json.dumps({"text": r, "n": i}) + "\n" for i, r in enumerate(rows))
        if k < 3:
            (jsonl / f"part-{k:05d}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        else:
            with pa.CompressedOutputStream(str(jsonl / f"part-{k:05d}.jsonl.zst"), "zstd") as f:
                f.write(lines.encode())
    (parquet / "_SUCCESS").write_text("")
    (jsonl / ".part-00000.jsonl.gz.crc").write_text("x")
    return {"root": root, "parquet": parquet, "jsonl": jsonl}


def text_set(source, **kw) -> DatasetSpec:
    return DatasetSpec(name="corpus", source=str(source), kind="text", **kw)


@pytest.mark.parametrize("form", ["parquet folder", "jsonl glob", "jsonl folder", "file uri",
                                  "uri with a query"])
def test_shards_read_as_one_set_in_corpus_order(corpus, form):
    source = {"parquet folder": corpus["parquet"],
              "jsonl glob": f"{corpus['jsonl']}/part-*.jsonl.*",
              "jsonl folder": corpus["jsonl"],
              "file uri": f"file://{corpus['parquet']}/*.parquet",
              # a URI's ?query (a token, a region) is neither its path nor a glob
              "uri with a query": f"file://{corpus['parquet']}/part-*.parquet?token=a?b"}[form]
    ds = text_set(source)
    assert len(list_shards(ds)) == len(SHARDS)
    assert load_dataset_rows(ds).column("text").to_pylist() == ALL_ROWS


def test_one_compressed_file_and_a_glob_that_matches_nothing(corpus):
    one = text_set(corpus["jsonl"] / "part-00001.jsonl.gz")
    assert load_dataset_rows(one).column("text").to_pylist() == rows_of(1, SHARDS[1])
    with pytest.raises(DataError, match="no files match .*nothing-"):
        read_plan(text_set(f"{corpus['jsonl']}/nothing-*.jsonl.gz"))


def test_parquet_units_follow_row_groups_and_count_from_footers(corpus, monkeypatch):
    monkeypatch.setattr(data_module, "UNIT_ROWS", 256)
    units = read_plan(text_set(corpus["parquet"]))
    assert len(units) > len(SHARDS)  # big shards are cut into several units
    assert plan_rows(units) == sum(SHARDS)
    got = [r for u in units for b in data_module.read_unit(text_set(corpus["parquet"]), u)
           for r in b.column("text").to_pylist()]
    assert got == ALL_ROWS


def sample(source, n, seed=0) -> list[str]:
    return load_dataset_rows(text_set(source, sample_rows=n, sample_seed=seed)) \
        .column("text").to_pylist()


def test_sample_draws_from_every_shard_and_is_the_same_for_the_same_seed(corpus):
    glob = f"{corpus['jsonl']}/*.jsonl.*"
    first = sample(corpus["parquet"], 300)
    assert len(first) == len(set(first)) == 300
    assert first == sample(corpus["parquet"], 300)  # the same seed, the same rows
    assert first == sample(glob, 300)  # and the same rows whatever the format
    assert first != sample(corpus["parquet"], 300, seed=1)
    assert set(first) <= set(ALL_ROWS)
    per_shard = np.array([sum(r.startswith(f"shard {k} ") for r in first)
                          for k in range(len(SHARDS))])
    assert (per_shard > 0).all()
    expected = 300 * np.array(SHARDS) / sum(SHARDS)
    assert np.abs(per_shard - expected).max() < 5 * np.sqrt(expected).max()
    assert first == sorted(first, key=ALL_ROWS.index)  # in corpus order


def test_sample_reads_only_the_row_groups_that_hold_its_rows(corpus):
    units = read_plan(text_set(corpus["parquet"], sample_rows=5, sample_seed=3))
    groups = sum(len(u.row_groups) for u in units)
    assert plan_rows(units) == 5 and groups <= 5
    assert groups < sum(-(-n // 128) for n in SHARDS)


@pytest.mark.parametrize("form", ["parquet", "jsonl"])
def test_sample_larger_than_the_set_keeps_every_row(corpus, form):
    """JSON Lines shards too, whose whole-shard units do not know their rows in advance (they
    were refused as 'no rows')."""
    assert sample(corpus[form], 10 * sum(SHARDS)) == ALL_ROWS


def test_max_rows_takes_the_first_rows_across_shards(corpus):
    ds = text_set(f"{corpus['jsonl']}/*.jsonl.*", max_rows=SHARDS[0] + 5)
    assert load_dataset_rows(ds).column("text").to_pylist() == ALL_ROWS[: SHARDS[0] + 5]
    with pytest.raises(ValueError, match="not both"):
        text_set(corpus["parquet"], max_rows=3, sample_rows=3)


def broken_copy(corpus, tmp_path, form: str) -> tuple[Path, Path]:
    """A copy of the corpus with shard 2 corrupt (garbage inside gzip, cut Parquet)."""
    folder = tmp_path / form
    folder.mkdir()
    for f in sorted(corpus[form].iterdir()):
        (folder / f.name).write_bytes(f.read_bytes())
    bad = sorted(p for p in folder.iterdir() if p.name.startswith("part-00002"))[0]
    if form == "jsonl":
        bad.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": broken\n'))
    else:
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return folder, bad


@pytest.mark.parametrize("form", ["jsonl", "parquet"])
def test_a_corrupt_shard_is_refused_in_one_line_naming_it(corpus, tmp_path, form):
    folder, bad = broken_copy(corpus, tmp_path, form)
    with pytest.raises(DataError) as err:
        load_dataset_rows(text_set(folder))
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "dataset 'corpus'" in message
    if form == "parquet":  # a footer that cannot be read is found before any row is read
        with pytest.raises(DataError, match=str(bad)):
            check_dataset_header(text_set(folder))


def test_a_folder_is_read_by_what_it_holds(corpus, tmp_path):
    with pytest.raises(DataError, match="no data files in the folder"):
        read_plan(text_set(tmp_path))
    (tmp_path / "notes.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot tell the format of shard .*notes.bin"):
        read_plan(text_set(tmp_path))


def test_json_values_that_mix_numbers_and_strings_read_as_text(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "1+1", "target": 2}\n\n{"prompt": "a", "target": "b"}\n')
    rows = load_dataset_rows(DatasetSpec(name="m", source=str(path)))
    assert rows.column("target").to_pylist() == ["2", "b"]


def test_a_subset_samples_among_its_own_rows(tmp_path):
    n = 2000
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(n)],
                             "target": [f"t{i}" for i in range(n)],
                             "dataset": ["a" if i % 4 else "b" for i in range(n)]}),
                   tmp_path / "mix.parquet", row_group_size=100)
    ds = DatasetSpec(name="b", source=str(tmp_path / "mix.parquet"), subset="b",
                     sample_rows=50, sample_seed=2)
    rows = load_dataset_rows(ds).column("prompt").to_pylist()
    assert len(set(rows)) == 50 and all(int(p[1:]) % 4 == 0 for p in rows)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> dict[str, Path]:
    """Ten gzipped JSON Lines shards of 6,000 rows (about 0.5 MB each before compression)
    and the same rows as two Parquet shards."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    words = np.array("the a model data set of to and in loss train test corpus".split())
    rows = [" ".join(rng.choice(words, size=int(rng.integers(5, 25)))) for _ in range(60_000)]
    (root / "jsonl").mkdir()
    for k in range(10):
        lines = "".join(json.dumps({"text": r}) + "\n" for r in rows[k * 6000:(k + 1) * 6000])
        (root / "jsonl" / f"part-{k:03d}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (root / "parquet").mkdir()
    for k in range(2):
        pq.write_table(pa.table({"text": rows[k * 30_000:(k + 1) * 30_000]}),
                       root / "parquet" / f"{k}.parquet", row_group_size=5000)
    return root


def validate_lines(make_job, source, monkeypatch, *extra, **ds):
    from typer.testing import CliRunner

    from untrac_ray.cli import app
    from untrac_ray.inputs import survey

    monkeypatch.setattr(survey, "PEEK_BYTES", 16 * 1024)  # the first 16 KB of each shard
    job = make_job({"data": {"train": [{"name": "corpus", "source": str(source),
                                        "kind": "text", **ds}]}})
    result = CliRunner().invoke(app, ["validate", str(job), *extra])
    assert result.exit_code == 0, result.output
    return next(line for line in result.output.splitlines()
                if line.startswith("data.train corpus:"))


def estimated_tokens(line: str) -> float:
    import re

    number, unit = re.search(r"about ([\d.,]+)(K|M)? tokens", line).groups()
    return float(number.replace(",", "")) * {"K": 1e3, "M": 1e6, None: 1}[unit]


def rows_in(line: str) -> float:
    import re

    number, unit = re.search(r"([\d.,]+)(K|M)? rows", line).groups()
    return float(number.replace(",", "")) * {"K": 1e3, "M": 1e6, None: 1}[unit]


def test_validate_estimates_a_big_set_and_says_so(big_corpus, make_job, monkeypatch):
    line = validate_lines(make_job, big_corpus / "jsonl", monkeypatch)
    assert "about" in line and "estimated from" in line and "in 10 shards" in line
    assert abs(rows_in(line) - 60_000) / 60_000 < 0.15
    exact = validate_lines(make_job, big_corpus / "jsonl", monkeypatch, "--exact")
    assert "60,000 rows" in exact and "about" not in exact and "estimated" not in exact
    tokens = int(exact.split(" tokens")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert abs(tokens - estimated_tokens(line)) / tokens < 0.15  # the estimate was near
    footers = validate_lines(make_job, big_corpus / "parquet", monkeypatch)  # exact, unread
    assert "about" not in footers.split(" of text")[0] and rows_in(footers) == 60_000
    sampled = validate_lines(make_job, big_corpus / "parquet", monkeypatch, sample_rows=500)
    assert sampled.startswith("data.train corpus: 500 rows (sample_rows) of 60")
