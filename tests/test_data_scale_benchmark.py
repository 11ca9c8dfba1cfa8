"""benchmarks/data_scale.py in pieces, in seconds: the corpus writer's shards (both forms, the
sizes asked, the same bytes for a seed), the generator's reuse through its marker, the memory
sampler of a process tree, the log and cache readers, and the report's verdicts on given
numbers. The whole script on tiny corpora (`--smoke`: real `untrac-ray validate` and `run`
subprocesses, Ray) is marked slow."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import load_benchmark

REPO = Path(__file__).resolve().parent.parent

ds = load_benchmark("data_scale")

POOL = [f"Row {i} says something about {'numbers ' * (i % 7 + 1)}and stops." for i in range(50)]
COUNTS = ds.np.array([10 + i % 7 for i in range(50)], dtype=ds.np.int64)


def parquet_texts(folder: Path) -> list[str]:
    return [t for p in sorted(folder.glob("*.parquet"))
            for t in pq.read_table(p).column("text").to_pylist()]


def jsonl_texts(folder: Path) -> list[str]:
    out = []
    for p in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(p, "rt") as f:
            out += [json.loads(line)["text"] for line in f]
    return out


def test_a_corpus_is_written_as_parquet_and_gzipped_jsonl_shards(tmp_path):
    stats = ds.write_corpus(tmp_path / "c", POOL, COUNTS, tokens=5000, seed=0, corpus=0,
                            shards=3, row_groups=2, jsonl=True)
    parquet = sorted((tmp_path / "c" / "parquet").iterdir())
    jsonl = sorted((tmp_path / "c" / "jsonl").iterdir())
    assert [p.name for p in parquet] == [f"part-0000{i}.parquet" for i in range(3)]
    assert [p.name for p in jsonl] == [f"part-0000{i}.jsonl.gz" for i in range(3)]
    assert all(pq.ParquetFile(p).metadata.num_row_groups >= 2 for p in parquet)
    assert pq.read_schema(parquet[0]).names == ["text"]
    texts = parquet_texts(tmp_path / "c" / "parquet")
    assert texts == jsonl_texts(tmp_path / "c" / "jsonl")  # the same rows in both forms
    assert stats.shards == 3 and stats.rows == len(texts)
    # the tokens asked, passed by less than one row
    assert 5000 <= stats.tokens < 5000 + COUNTS.max()
    assert stats.tokens == sum(int(COUNTS[POOL.index(t)]) for t in texts)
    assert stats.parquet_bytes > 0 and stats.jsonl_bytes > 0


def test_the_corpus_repeats_its_pool_in_seeded_shuffled_passes():
    rows = list(ds.corpus_rows(COUNTS, tokens=int(COUNTS.sum()) * 2 + 1, seed=3, corpus=1))
    first, second = rows[:50], rows[50:100]
    assert sorted(first) == sorted(second) == list(range(50))  # each pass: every row once
    assert first != second and first != list(range(50))  # in its own shuffled order
    assert len(rows) > 100  # the third pass crosses the tokens asked
    assert rows == list(ds.corpus_rows(COUNTS, int(COUNTS.sum()) * 2 + 1, 3, 1))
    assert rows != list(ds.corpus_rows(COUNTS, int(COUNTS.sum()) * 2 + 1, 4, 1))


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    def write(name: str, seed: int) -> Path:
        ds.write_corpus(tmp_path / name, POOL, COUNTS, 3000, seed, 0, 2, 2, jsonl=True)
        return tmp_path / name

    one, two, other = write("one", 0), write("two", 0), write("other", 1)
    for form in ("parquet", "jsonl"):
        for a, b in zip(sorted((one / form).iterdir()), sorted((two / form).iterdir()),
                        strict=True):
            assert a.read_bytes() == b.read_bytes()
    assert parquet_texts(one / "parquet") != parquet_texts(other / "parquet")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Tiny corpora of the venv's text: 4 x 20,000 tokens, 3 shards, and the 10x variant."""
    cache = tmp_path_factory.mktemp("data_scale")
    params = ds.CorpusParams(corpora=4, tokens_per_corpus=20_000, shards=3, row_groups=2,
                             seed=0, pool_chars=120_000, tokenizer_sample_chars=120_000)
    return cache, params, ds.generate(cache, params, [1, ds.TEN_X])


def test_the_generated_corpora_hold_the_tokens_asked(generated):
    from transformers import AutoTokenizer

    _, params, corpora = generated
    assert corpora.names == ["numerics", "torch", "hf", "others"]
    tok = AutoTokenizer.from_pretrained(corpora.model)
    assert len(tok) == ds.VOCAB_SIZE and tok.eos_token == ds.EOS
    assert (corpora.model / "config.json").exists()
    texts = {}
    for name in corpora.names:
        for scale in (1, ds.TEN_X):
            stats = corpora.stats[f"{scale}x"][name]
            asked = params.tokens_per_corpus * scale
            # passed by less than one row (an ASCII row: at most a token a character + 1)
            assert asked <= stats["tokens"] <= asked + ds.MAX_CHARS + 1
            folder = corpora.shard_folder(scale, name, "parquet")
            assert len(list(folder.glob("*.parquet"))) == params.shards
        texts[name] = parquet_texts(corpora.shard_folder(1, name, "parquet"))
        assert texts[name] == jsonl_texts(corpora.shard_folder(1, name, "jsonl"))
        ids = tok(texts[name], add_special_tokens=False)["input_ids"]
        assert sum(len(x) + 1 for x in ids) == corpora.stats["1x"][name]["tokens"]
        assert not corpora.shard_folder(ds.TEN_X, name, "jsonl").exists()  # Parquet only
    # the corpora differ (package groups), and the test set is in none of them
    assert not set(texts["numerics"]) & set(texts["torch"])
    test = [json.loads(line)["text"] for line in corpora.test.read_text().splitlines()]
    assert len(test) == ds.TEST_ROWS and not set(test) & set().union(*texts.values())


def test_generation_is_deterministic(generated, tmp_path):
    """Another cache, the same parameters: the same tokenizer and the same shards' bytes."""
    _, params, corpora = generated
    again = ds.generate(tmp_path, params, [1])
    assert again.reused == {ds.BASE: False, "1x": False}
    assert ((again.root / "tokenizer" / "tokenizer.json").read_bytes()
            == (corpora.root / "tokenizer" / "tokenizer.json").read_bytes())
    for name in corpora.names:
        for form in ("parquet", "jsonl"):
            ours = sorted(again.shard_folder(1, name, form).iterdir())
            theirs = sorted(corpora.shard_folder(1, name, form).iterdir())
            assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs]


def test_generation_is_reused_through_its_marker(generated):
    cache, params, corpora = generated
    shard = corpora.shard_folder(1, "torch", "parquet") / "part-00000.parquet"
    before = shard.stat().st_mtime_ns
    again = ds.generate(cache, params, [1])
    assert again.reused == {ds.BASE: True, "1x": True}
    assert again.stats["1x"] == corpora.stats["1x"]
    assert shard.stat().st_mtime_ns == before
    marker = json.loads((corpora.root / "1x" / "marker.json").read_text())
    assert marker["params"]["tokens_per_corpus"] == params.tokens_per_corpus
    # another size of corpus: other files, the same tokenizer and model
    bigger = ds.CorpusParams(**{**ds.asdict(params), "tokens_per_corpus": 24_000})
    assert bigger.root(cache) == params.root(cache)
    ds.generate(cache, bigger, [1])  # regenerates 1x only
    assert ds.read_marker(corpora.root)["params"] == params.base_key()
    assert ds.read_marker(corpora.root / "1x")["params"]["tokens_per_corpus"] == 24_000


def test_the_job_of_each_case(generated, tmp_path):
    _, _, corpora = generated
    spec = {}
    for case in "abc":
        job = ds.write_job(tmp_path / case, corpora, case, "glob", 500, tmp_path)
        spec[case] = ds.yaml.safe_load(job.read_text())
    train = spec["a"]["data"]["train"]
    assert [d["name"] for d in train] == corpora.names
    assert train[0]["source"].endswith("1x/numerics/parquet/*.parquet")
    assert train[0]["kind"] == "text" and "sample_rows" not in train[0]
    assert spec["b"]["data"]["train"][0]["source"].endswith("1x/numerics/jsonl/*.jsonl.gz")
    c = spec["c"]["data"]["train"][0]
    assert c["source"].endswith("10x/numerics/parquet/*.parquet")
    assert (c["sample_rows"], c["sample_seed"]) == (500, 0)
    assert spec["a"]["methods"]["untrac"]["max_steps"] == 10
    assert spec["a"]["tracking"]["uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = ds.source_of(corpora, 1, "hf", "jsonl", "file")
    assert one["source"].endswith("part-00000.jsonl.gz") and one["format"] == "jsonl"
    assert ds.source_of(corpora, 1, "hf", "parquet", "folder")["source"].endswith("parquet")


def test_the_sampler_sums_the_whole_process_tree():
    proc = subprocess.Popen(["bash", "-c", "sleep 3 & (sleep 3 & wait) & wait"])
    try:
        with ds.TreeSampler(proc.pid, interval=0.05) as sampler:
            time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()
    m = sampler.memory
    assert m.samples >= 5 and m.processes >= 4
    assert 0 < m.driver_rss < m.sum_rss
    assert m.sum_pss is not None and 0 < m.sum_pss <= m.sum_rss


def test_the_log_gives_the_data_stage_and_the_refusal():
    lines = [(0.5, "> loading and tokenizing datasets"), (3.0, "> base losses of 5 sets"),
             (9.0, "tasks: 5 to run")]
    assert ds.stage_seconds(lines) == 2.5
    assert ds.stage_seconds(lines[:1]) is None
    out = [(0.1, "Traceback"), (0.2, "error: data.train.0.sample_rows: unknown key"),
           (0.3, "")]
    assert ds.refusal(out) == "error: data.train.0.sample_rows: unknown key"
    assert ds.refusal([(0.1, "Killed")]) == "Killed"


def test_stored_tokens_are_counted_in_the_store(tmp_path):
    from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec
    from untrac_ray.inputs.token_store import tokenized_dataset
    from untrac_ray.inputs.tokenization import byte_level_tokenizer

    source = tmp_path / "t.jsonl"
    source.write_text("".join(json.dumps({"text": f"row {i} " * 9}) + "\n" for i in range(50)))
    tok, cache = byte_level_tokenizer(), tmp_path / "cache"
    total = sum(tokenized_dataset(DatasetSpec(name=n, source=str(source), kind="text"), tok,
                                  TokenizerSpec(block_size=bs), str(cache)).tokens
                for n, bs in (("a", 16), ("b", 32)))
    assert ds.stored_tokens(cache / "tokenized") == total > 0
    assert ds.stored_tokens(tmp_path / "none") is None
    other = tmp_path / "other"  # another layout: the run's data_tokens count instead
    (other / "x").mkdir(parents=True)
    (other / "x" / "meta.json").write_text("{}")
    assert ds.stored_tokens(other) is None


def case(name: str, **kw) -> ds.CaseResult:
    memory = ds.TreeMemory(driver_rss=kw.pop("driver", int(1e9)),
                           sum_rss=int(5e9), sum_pss=kw.pop("pss", int(3e9)))
    base = {"validate_seconds": 12.0, "run_seconds": 100.0, "data_seconds": 50.0,
            "data_tokens": 10_000_000, "stored_tokens": 10_000_000, "stored_bytes": 20_000_000}
    return ds.CaseResult(name, ds.CASES[name], memory=memory, **{**base, **kw})


def test_the_report_gives_a_verdict_per_target(capsys):
    reference = ds.Reference(texts=10, chars=100, tokens=1_000_000, seconds=4.0, threads=2)
    results = {
        "a": case("a"),  # 200,000 tok/s against 250,000: 0.8x
        "b": case("b", driver=int(2.5e9), pss=int(4.5e9), data_seconds=100.0,
                  stored_bytes=30_000_000, validate_seconds=75.0),
        "c": case("c", run_seconds=40.0),
    }
    verdicts = {(c.case, c.name): c.ok for c in ds.checks(results, reference)}
    assert verdicts == {
        ("a", "driver peak RSS"): True, ("a", "all processes, peak sum PSS"): True,
        ("a", "bytes per stored token"): True,
        ("a", "tokenization / tokenizer's batch rate"): True,
        ("a", "validate wall time"): True,
        ("b", "driver peak RSS"): False, ("b", "all processes, peak sum PSS"): False,
        ("b", "bytes per stored token"): False,
        ("b", "tokenization / tokenizer's batch rate"): False,
        ("b", "validate wall time"): False,
        ("c", "driver peak RSS"): True, ("c", "all processes, peak sum PSS"): True,
        ("c", "whole job / 1x full job"): True,
    }
    ds.print_report(results, reference)
    out = capsys.readouterr().out
    assert "200,000 / 250,000 tok/s = 0.80x" in out and "40.0 s / case a's 100.0 s = 0.40x" in out
    assert out.count("PASS") == 8 and out.count("FAIL") == 5
    # a case's own reference (measured just before it) goes before the run's
    own = case("a", reference=ds.Reference(10, 100, 1_000_000, 2.0, 2))  # 500,000 tok/s
    (rate,) = [c for c in ds.checks({"a": own}, reference) if c.name.startswith("tokenization")]
    assert rate.ok is False and "= 0.40x" in rate.value
    # case c against b when a is missing; slower than half of it fails
    results = {"b": case("b"), "c": case("c", run_seconds=60.0)}
    (ratio,) = [c for c in ds.checks(results, reference) if c.name.startswith("whole job")]
    assert ratio.ok is False and "case b's" in ratio.value


def test_a_refused_case_or_a_missing_figure_has_no_verdict(capsys):
    refused = ds.CaseResult("c", ds.CASES["c"], validate_seconds=3.0,
                            refused="validate: error: data.train.0.sample_rows: unknown key")
    (check,) = ds.checks({"c": refused}, None)
    assert (check.name, check.ok) == ("refused", None)
    no_pss = case("a", pss=None, stored_bytes=None)
    verdicts = {c.name: c.ok for c in ds.checks({"a": no_pss}, None)}
    assert verdicts["all processes, peak sum PSS"] is None
    assert verdicts["bytes per stored token"] is None
    assert verdicts["tokenization / tokenizer's batch rate"] is None  # no reference
    alone = {c.name: c.ok for c in ds.checks({"c": case("c")}, None)}
    assert alone["whole job / 1x full job"] is None  # no 1x job to compare with
    ds.print_report({"c": refused}, None)
    out = capsys.readouterr().out
    assert "refused: validate: error: data.train.0.sample_rows" in out and "n/a" in out


def test_flags():
    args = ds.parse_args([])
    assert (args.tokens_per_corpus, args.shards, args.sample_rows) == (41_000_000, 8, 10_000)
    assert args.cases == ["a", "b", "c"] and args.cache == ds.DEFAULT_CACHE
    smoke = ds.parse_args(["--smoke", "--cases", "a,c", "--corpora", "8"])
    assert smoke.tokens_per_corpus == ds.SMOKE_TOKENS and smoke.cases == ["a", "c"]
    assert smoke.pool_chars == 8 * ds.SMOKE_TOKENS and smoke.corpora == 8
    with pytest.raises(SystemExit):
        ds.parse_args(["--cases", "d"])
    with pytest.raises(SystemExit, match="inside the repository"):
        ds.main(["--smoke", "--cache", str(REPO / "data" / "bench")])


@pytest.mark.slow
def test_the_whole_benchmark_on_tiny_corpora(tmp_path):
    """`--smoke`: every case; with `--source-form file` today's reader takes cases a and b (the
    first shard), and case c is measured or its refusal reported (a minute or two)."""
    out_json = tmp_path / "figures.json"
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_scale.py"), "--smoke",
                          "--source-form", "file", "--cache", str(tmp_path / "cache"),
                          "--json", str(out_json)],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    for heading in ("== the tokenizer's own batch rate", "== case a", "== case b", "== case c",
                    "== targets"):
        assert heading in out
    figures = json.loads(out_json.read_text())
    for name in ("a", "b"):
        r = figures["cases"][name]
        assert r["refused"] is None and r["run_seconds"] > 0 and r["data_tokens"] > 0
        assert r["memory"]["sum_pss"] > r["memory"]["driver_rss"] * 0.5
        assert r["bytes_per_token"] > 0
    c = figures["cases"]["c"]
    assert c["refused"] or c["run_seconds"] > 0
    assert figures["corpora"]["generation_seconds"]["1x"] >= 0
