"""The tokenized store: what a set keeps on disk, its cache key, Ray Data tokenization, how
actors read the sets, and the data stage inside the MLflow run's duration."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from untrac_ray.engine.data_stage import (
    needs_object_store,
    open_shared,
    share_sets,
    tokenize_on_cluster,
)
from untrac_ray.inputs.data import ReadUnit
from untrac_ray.inputs.errors import DataError
from untrac_ray.inputs.sources import Shard
from untrac_ray.inputs.spec_sections import DatasetSpec, ResourcesSpec, TokenizerSpec
from untrac_ray.inputs.token_store import IDS, META, tokenized_dataset
from untrac_ray.inputs.tokenization import (
    byte_level_tokenizer,
    load_tokenizer,
    token_dtype,
    tokenize_rows,
)

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 40)))) for _ in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_a_text_set_stores_only_its_ids_in_uint16_and_its_labels_are_the_ids(tmp_path):
    tok = byte_level_tokenizer()
    source = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in _texts(300)])
    ds = DatasetSpec(name="t", source=source, kind="text")
    stored = tokenized_dataset(ds, tok, TokenizerSpec(block_size=32), str(tmp_path / "cache"))
    folder = Path(stored.folder)
    assert sorted(p.name for p in folder.iterdir()) == [IDS, META]  # no labels, no offsets
    assert stored.dtype == "uint16" and token_dtype(tok) == np.uint16
    assert (folder / IDS).stat().st_size == 2 * stored.tokens  # 2 bytes per token
    assert stored.stored_bytes / stored.tokens == 2.0
    data = stored.open(tok.pad_token_id)
    assert isinstance(data.input_ids, np.memmap) or isinstance(data.input_ids.base, np.memmap)
    batch = data.batch(np.arange(len(data)))
    assert batch["attention_mask"].all()  # full blocks
    assert (batch["labels"] == batch["input_ids"]).all()
    assert len(data) == stored.tokens // 32 == stored.rows


def test_prompt_rows_store_loss_start_not_labels(tmp_path):
    tok = byte_level_tokenizer()
    texts = _texts(50)
    pairs = list(zip(texts, texts[::-1], strict=True))
    source = _jsonl(tmp_path / "p.jsonl", [{"prompt": p, "target": t} for p, t in pairs])
    ds = DatasetSpec(name="p", source=source)
    stored = tokenized_dataset(ds, tok, TokenizerSpec(max_length=512), str(tmp_path / "cache"))
    names = sorted(p.name for p in Path(stored.folder).iterdir())
    assert names == [IDS, "loss_start.npy", META, "offsets.npy"]
    data = stored.open(tok.pad_token_id)
    batch = data.batch(np.arange(len(data)))
    for i, (prompt, target) in enumerate(pairs):
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()
        first = int(data.loss_start[i])
        assert labels[:first] == [-100] * first and labels[first:] == ids[first:]
        assert tok.decode(ids[1:first]) == prompt + "\n"  # <bos> prompt separator
        assert tok.decode(ids[first:-1]) == target and ids[-1] == tok.eos_token_id


def test_a_vocabulary_over_65536_ids_is_stored_in_uint32():
    class Big:
        def __len__(self) -> int:
            return 2**16 + 1

    assert token_dtype(Big()) == np.uint32


def _bpe_folder(folder: Path, corpus: list[str], size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<unk>", "<eos>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def test_the_cache_changes_with_the_tokenizers_content_at_the_same_path_and_size(tmp_path):
    source = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in _texts(40)])
    ds = DatasetSpec(name="t", source=source, kind="text")
    folder, cache = tmp_path / "tok", str(tmp_path / "cache")
    spec = TokenizerSpec(kind="pretrained", path=str(folder), block_size=16)
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus_a = [" ".join(WORDS)] * 50
    corpus_b = [" ".join(letters[i:] + letters[:i] for i in range(26))] * 50
    _bpe_folder(folder, corpus_a, 60)
    first_tok = load_tokenizer(spec)
    first = tokenized_dataset(ds, first_tok, spec, cache).open(0).input_ids.copy()
    _bpe_folder(folder, corpus_b, 60)  # the same folder, the same number of ids
    second_tok = load_tokenizer(spec)
    assert len(second_tok) == len(first_tok) and second_tok.name_or_path == first_tok.name_or_path
    second = tokenized_dataset(ds, second_tok, spec, cache).open(0).input_ids
    expected = tokenize_rows(ds, pa.table({"text": _texts(40)}), second_tok, spec).input_ids
    assert np.array_equal(second, expected)  # the new tokenizer's ids, not the cached ones
    assert not np.array_equal(first[: len(second)], second[: len(first)])


def _units_reader(table: pa.Table, cut: list[int], slow_first: float):
    """A read plan of several units over `table` and its reader (unit 0 slow to finish, to
    show that the order kept is the corpus's, not the order the tasks end in)."""
    bounds = list(zip([0, *cut], [*cut, table.num_rows], strict=True))
    units = [ReadUnit(Shard("rows.parquet", "parquet"), n_rows=b - a) for a, b in bounds]

    def read(ds, unit):
        import time as _time

        index = next(i for i, u in enumerate(units) if u is unit)
        start, stop = bounds[index]
        part = table.slice(start, stop - start)
        for i, batch in enumerate(part.to_batches(max_chunksize=37)):
            if index == 0 and i == 1:
                _time.sleep(slow_first)
            yield batch

    return units, read


@pytest.mark.parametrize("kind", ["text", "prompt_target"])
def test_ray_data_tokenization_gives_the_in_memory_ids(kind, tmp_path, ray_cluster):
    tok = byte_level_tokenizer()
    texts = _texts(400)
    table = (pa.table({"text": texts}) if kind == "text"
             else pa.table({"prompt": texts, "target": texts[::-1]}))
    pq.write_table(table, tmp_path / "rows.parquet")  # the source the cache key fingerprints
    ds = DatasetSpec(name="s", source=str(tmp_path / "rows.parquet"), kind=kind)
    spec = TokenizerSpec(block_size=24, max_length=40)
    units, read = _units_reader(table, [90, 200, 310], slow_first=1.0)
    seen = []
    stored = tokenize_on_cluster(ds, tok, spec, str(tmp_path / "cache"),
                                 lambda rows, total, tokens: seen.append((rows, tokens)),
                                 units=units, read=read)
    expected = tokenize_rows(ds, table, tok, spec)
    got = stored.open(tok.pad_token_id)
    assert np.array_equal(got.input_ids, expected.input_ids)
    assert np.array_equal(got.offsets, expected.offsets)
    if kind == "prompt_target":
        assert np.array_equal(got.loss_start, expected.loss_start)
    assert stored.source_rows == 400 and seen[-1] == (400, stored.tokens)
    assert [r for r, _ in seen] == sorted(r for r, _ in seen) and len(seen) > 4  # as it goes


def test_actors_read_a_memory_mapped_set_or_through_the_object_store_the_same(tmp_path,
                                                                              ray_cluster):
    tok = byte_level_tokenizer()
    source = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in _texts(200)])
    ds = DatasetSpec(name="t", source=source, kind="text")
    stored = tokenized_dataset(ds, tok, TokenizerSpec(block_size=16), str(tmp_path / "cache"))
    rows = [0, 3, 7]

    @ray.remote
    def batch_in_worker(sets):
        data = open_shared(ray.get(sets["t"]), 0)  # a ref nested in a dict, as actors get it
        mapped = isinstance(data.input_ids, np.memmap) or isinstance(
            getattr(data.input_ids, "base", None), np.memmap)
        return mapped, {k: v.numpy() for k, v in data.batch(rows).items()}

    expected = {k: v.numpy() for k, v in stored.open(0).batch(rows).items()}
    local = share_sets({"t": stored}, through_store=False)
    assert local["t"].arrays is None
    mapped, batch = ray.get(batch_in_worker.remote({"t": ray.put(local["t"])}))
    assert mapped
    for key, value in expected.items():
        assert np.array_equal(batch[key], value)

    remote = share_sets({"t": stored}, through_store=True)
    Path(stored.folder).rename(tmp_path / "elsewhere")  # as on a node that has no cache
    mapped, batch = ray.get(batch_in_worker.remote({"t": ray.put(remote["t"])}))
    assert not mapped
    for key, value in expected.items():
        assert np.array_equal(batch[key], value)
    with pytest.raises(DataError, match="not on this node"):
        open_shared(local["t"], 0)


def test_sets_go_through_the_object_store_with_another_host_or_an_autoscaler(monkeypatch,
                                                                             ray_cluster):
    here = ray.util.get_node_ip_address()
    assert not needs_object_store(ResourcesSpec())
    assert needs_object_store(ResourcesSpec(autoscale=True, num_actors=2))
    nodes = [{"Alive": True, "NodeManagerAddress": here},
             {"Alive": True, "NodeManagerAddress": "10.9.9.9"}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert needs_object_store(ResourcesSpec())


def test_the_runs_duration_covers_the_data_stage_and_logs_its_cost(make_job, tracking_uri,
                                                                   ray_cluster, monkeypatch):
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.run import job_setup
    from untrac_ray.run.runner import run_job

    real = job_setup.tokenize_on_cluster
    began: list[float] = []

    def slow(*args, **kwargs):
        if not began:
            began.append(time.time())
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(job_setup, "tokenize_on_cluster", slow)
    spec = load_spec(make_job({"methods": {"untrac": None}}))
    spec.data.test = spec.data.test[:1]
    outcome = run_job(spec, tracking_uri)
    run = MlflowClient(tracking_uri=tracking_uri).get_run(outcome.run_id)
    assert run.info.start_time <= began[0] * 1000
    metrics = run.data.metrics
    assert metrics["data_seconds"] >= 0.5 * 4  # four sets, each tokenized here
    assert metrics["data_tokens"] > 0 and metrics["data_tokens_per_s"] > 0
    assert (run.info.end_time - run.info.start_time) / 1000 >= metrics["data_seconds"]


def test_a_readers_data_error_in_a_ray_data_task_is_one_line(tmp_path, ray_cluster):
    source = _jsonl(tmp_path / "b.jsonl", [{"body": "no text column"}])
    ds = DatasetSpec(name="b", source=source, kind="text")
    with pytest.raises(DataError) as err:
        tokenize_on_cluster(ds, byte_level_tokenizer(), TokenizerSpec(), str(tmp_path / "c"))
    assert str(err.value) == f"dataset 'b': column 'text' not found in {source} (columns: body)"
    assert not list((tmp_path / "c" / "tokenized").iterdir())  # no half cache left behind


def test_the_backend_call_gives_the_ids_the_tokenizer_gives(tmp_path):
    """_encode calls a fast tokenizer's backend directly: the same ids as tok(texts), for the
    byte tokenizer and a trained BPE (with merges, a pre-tokenizer and unicode text)."""
    from untrac_ray.inputs.tokenization import _encode

    folder = tmp_path / "bpe"
    _bpe_folder(folder, _texts(200), 300)
    texts = [*_texts(50), "héllo wörld ünïcode — dash", "  leading spaces", "", "a\nb\tc"]
    for tok in (byte_level_tokenizer(), load_tokenizer(TokenizerSpec(kind="pretrained",
                                                                    path=str(folder)))):
        assert _encode(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
