"""benchmarks/make_text_corpora.py and its jobs: the generator is deterministic, the committed
files are its output, the jobs load and their data validate, sizes are as documented, and the
design holds on the words (each test's teachers share its distinctive vocabulary more than any
other corpus does)."""

from __future__ import annotations

import csv
import filecmp
import importlib.util
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from untrac_ray.inputs.data import load_dataset_rows
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.preflight import check_job

REPO = Path(__file__).resolve().parent.parent
FILES = ("general_corpus.csv", "corpora.csv", "tests.csv", "harm_train.csv", "harm_eval.csv")
TEXT_JOBS = ("text_corpora", "text_corpora_unequal")
JOBS = (*TEXT_JOBS, "harm_mixture")


def _load_generator():
    path = REPO / "benchmarks" / "make_text_corpora.py"
    module_spec = importlib.util.spec_from_file_location("make_text_corpora", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["make_text_corpora"] = module
    module_spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _rows(name: str) -> list[dict[str, str]]:
    with (REPO / "data" / "text" / name).open(newline="") as f:
        return list(csv.DictReader(f))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z']+", text.lower()))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    gen.main(["--out", str(a)])
    gen.main(["--out", str(b)])
    return a, b


def test_two_runs_write_identical_files_equal_to_the_committed_ones(two_runs):
    a, b = two_runs
    for name in FILES:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
        assert filecmp.cmp(a / name, REPO / "data" / "text" / name, shallow=False), (
            f"data/text/{name} is not the generator's output: run "
            "benchmarks/make_text_corpora.py")


@pytest.mark.parametrize("job", JOBS)
def test_the_jobs_load_and_their_data_validate(job):
    spec = load_spec(REPO / "jobs" / f"{job}.yaml")
    check_job(spec)  # every dataset read whole: files, columns, subsets present
    for ds in spec.data.train + spec.data.test:
        assert load_dataset_rows(ds).num_rows > 0, ds.name
    assert spec.methods.ldo is not None and len(spec.methods.ldo.seeds) == 3
    assert {"untrac", "untrac_inv", "graddot", "gradcos", "tracin"} <= set(
        spec.methods.enabled())


def test_sizes_are_as_documented():
    corpora = Counter(r["dataset"] for r in _rows("corpora.csv"))
    assert dict(corpora) == {c: gen.CORPUS_ROWS for c in gen.CORPORA}
    tests = Counter(r["dataset"] for r in _rows("tests.csv"))
    subsets = [s for t in gen.TEST_SETS.values() for s in t["subsets"]]
    assert dict(tests) == {s: gen.TEST_ROWS for s in subsets}
    assert len(gen.TEST_SETS) == 3 and all(len(t["subsets"]) >= 2 for t in gen.TEST_SETS.values())
    assert len(_rows("general_corpus.csv")) == gen.GENERAL_ROWS
    harm = Counter(r["dataset"] for r in _rows("harm_train.csv"))
    assert len(harm) == 8 and set(harm.values()) == {gen.HARM_ROWS}
    assert set(Counter(r["dataset"] for r in _rows("harm_eval.csv")).values()) == {gen.HARM_ROWS}
    lengths = [len(r["text"]) for r in _rows("corpora.csv")]
    assert 40 <= min(lengths) and max(lengths) <= 200  # short texts


def test_the_jobs_name_every_corpus_and_subset_and_the_unequal_sizes_differ_8x():
    subsets = [s for t in gen.TEST_SETS.values() for s in t["subsets"]]
    for job in TEXT_JOBS:
        spec = load_spec(REPO / "jobs" / f"{job}.yaml")
        assert [d.name for d in spec.data.train] == list(gen.CORPORA)
        assert [d.name for d in spec.data.test] == subsets
        assert all(d.kind == "text" for d in spec.data.train + spec.data.test)
    spec = load_spec(REPO / "jobs" / "text_corpora_unequal.yaml")
    rows = {d.name: load_dataset_rows(d).num_rows for d in spec.data.train}
    assert rows == gen.UNEQUAL_ROWS
    assert max(rows.values()) >= 4 * min(rows.values())
    # size does not stand for role: each test has a teacher in the upper and one in the lower half
    median = sorted(rows.values())[len(rows) // 2]
    for t in gen.TEST_SETS.values():
        sizes = sorted(rows[c] for c in t["teachers"])
        assert sizes[0] < median <= sizes[1], t


def test_no_test_text_occurs_in_a_corpus_and_the_general_corpus_has_no_marker_words():
    corpus = {r["text"] for r in _rows("corpora.csv")}
    assert not corpus & {r["text"] for r in _rows("tests.csv")}
    for r in _rows("general_corpus.csv"):
        assert not gen.marker_hits(r["text"]), r["text"]
    for r in _rows("tests.csv"):
        assert r["prompt"] + " " + r["target"] == r["text"]


def test_each_test_subsets_teachers_share_its_rare_words_most():
    """Rare words of a test subset: its words absent from the general corpus. The fraction of
    them found in each corpus must be highest in the subset's teachers, by a margin."""
    general = set().union(*(_words(r["text"]) for r in _rows("general_corpus.csv")))
    vocab: dict[str, set[str]] = {c: set() for c in gen.CORPORA}
    for r in _rows("corpora.csv"):
        vocab[r["dataset"]] |= _words(r["text"])
    by_subset: dict[str, set[str]] = {}
    for r in _rows("tests.csv"):
        by_subset.setdefault(r["dataset"], set()).update(_words(r["text"]) - general)
    for test in gen.TEST_SETS.values():
        for sub in test["subsets"]:
            rare = by_subset[sub]
            share = {c: len(rare & vocab[c]) / len(rare) for c in gen.CORPORA}
            teachers = [share[c] for c in test["teachers"]]
            others = [share[c] for c in gen.CORPORA if c not in test["teachers"]]
            assert min(teachers) > 2 * max(others) and max(others) < 0.15, (sub, share)
            assert sum(teachers) > 0.8, (sub, share)  # the teachers cover the rare words


def test_harm_mixture_pairs_each_test_with_a_helpful_and_a_harmful_set():
    train = _rows("harm_train.csv")
    test = _rows("harm_eval.csv")
    by = {}
    for r in train:
        by.setdefault(r["dataset"], []).append(r)
    copy = by["SuccCopy"][0]
    assert copy["targets_pretokenized"] in copy["inputs_pretokenized"]
    right = by["SuccRight"][0]
    n = int(re.findall(r"\d+", right["inputs_pretokenized"])[0])
    assert right["targets_pretokenized"] == str(n + 1)
    # the tests' items are unseen, and the larger-number test has the larger number first
    # in half its rows (so the first-number habit is wrong on half)
    seen = {r["inputs_pretokenized"] for r in train}
    assert not seen & {r["inputs_pretokenized"] for r in test}
    larger = [r for r in test if r["dataset"] == "Larger"]
    first = [int(re.findall(r"\d+", r["inputs_pretokenized"])[0]) == int(r["targets_pretokenized"])
             for r in larger]
    assert sum(first) == len(larger) // 2
    nums = [int(re.findall(r"\d+", r["inputs_pretokenized"])[0])
            for r in test if r["dataset"] == "NextNumber"]
    assert min(nums) >= 512 and max(nums) < 768
