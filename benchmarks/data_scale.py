"""The data path at scale: four corpora of about 41M tokens each read from shards, tokenized and
cached by a real `untrac-ray run`, timed and its memory sampled; and a 10x variant read through
`sample_rows`.

1. Corpora, generated once into a cache folder outside the repository (`--cache`, default
   ~/.cache/untrac-ray-bench/data_scale) and reused while the marker file beside them
   (`marker.json`: the parameters) matches. The text is real English of the venv's
   site-packages: the docstrings (read with ast, nothing imported) and the comment blocks of
   the installed packages, split into paragraphs; a paragraph is kept when it is ASCII prose (40+
   characters, 6+ words, 70% letters and spaces), a row is one docstring's or comment block's
   kept paragraphs (at most 4,000 characters), deduplicated. The packages are split into
   groups so that the corpora differ (`--corpora 4`: numerics = numpy, scipy, pandas; torch;
   hf = transformers, tokenizers, datasets, huggingface_hub, safetensors; others = ray, mlflow
   and every other package; `--corpora 8` splits them further, `GROUPS`); each group's files
   are read round-robin over its packages until its pool holds `POOL_CHARS` characters (or all
   there is). A group's pool is far smaller than a corpus: **the corpus repeats its pool**, each
   pass over it in its own seeded shuffled order of rows (seed `--seed`, the corpus and the
   pass), until the corpus holds `--tokens-per-corpus` tokens (default 41M; a row's tokens:
   its BPE tokens + 1 end-of-text, as a `kind: text` set stores them). So the corpora are large
   and their rows real, but a corpus holds each row many times over: this venv's pools hold 7-8
   MB of text (numerics, torch, hf) and 30 MB (others), so a 1x corpus (140-150 MB of text,
   380,000-680,000 rows) repeats each row about 5-20 times, a 10x corpus 50-200 times.
   A 4,096-id byte-level BPE (`tokenizers`, `<|endoftext|>` as bos/eos/pad/unk) is trained on
   a sample of the pools (`TOKENIZER_SAMPLE_CHARS`) and saved with
   PreTrainedTokenizerFast.save_pretrained. Each corpus is written in two forms, in one
   streaming pass (a row group's rows at a time, never a whole corpus in memory):
   `1x/<corpus>/parquet/part-00000.parquet ...` (`--shards` shards, `--row-groups` row groups
   each, one `text` column, snappy) and `1x/<corpus>/jsonl/part-00000.jsonl.gz ...` (gzipped
   JSON Lines, `{"text": ...}`). The 10x variant (`10x/<corpus>/parquet/`, about 410M tokens a
   corpus, the same number of shards, each 10x larger; Parquet only) is generated when case c
   is asked for. The test set: 200 rows of the standard library's docstrings (a fifth group, in
   no corpus), `test.jsonl`. Generation prints its progress and its seconds: at the defaults
   on 2 cores 3.2 minutes (reading the text 83 s, the tokenizer and the model 6 s, the pools'
   tokens 23 s, the 1x corpora 38 s, the 10x 43 s), a peak RSS of 0.84 GB; 0.5 GB on disk for
   the 1x corpora (both forms), 3.1 GB for the 10x. Case c's sample is 10,000 rows of each
   corpus, drawn from all of its shards: 1.5-2.6% of a 1x corpus's rows, a tenth of that of
   the 10x corpus it is drawn from.

2. A tiny model: GPT-2's shape, 2 layers, hidden 64, 2 heads, 128 positions, vocab 4,096,
   random weights, saved with save_pretrained together with the tokenizer (`model/`), so that
   the job's compute is small and the data stage dominates. The job: the corpora as training
   sets (`kind: text`, block_size 128), the test set, untrac and untrac_inv (Adam, batch 8,
   `max_steps: 10`), evaluation.max_examples 64, 2 actors of 1 CPU, a local SQLite MLflow
   store in the cache folder (`mlflow.db`), the job's cache_dir under `runs/<case>/cache`
   (emptied before each case, so that every case tokenizes).

3. Cases, each a real `untrac-ray validate` and then `untrac-ray run` subprocess, timed:
   (a) 1x, all of it, from the Parquet shards; (b) 1x, all of it, from the gzipped JSONL
   shards; (c) 10x with `sample_rows: 10000` (`--sample-rows`) on each training set. A case
   that the code refuses reports the refusal line as its result and the next case runs. For
   each case: the data stage's seconds and tokens (the run's MLflow metrics `data_seconds`,
   `data_tokens`; when a run lacks them, the seconds between the run's "> loading and
   tokenizing datasets" line and the next stage line, and the tokens stored in the cache)
   and tokens/s, against the tokenizer's own batch rate measured just before each 1x case on
   the same machine (`tokenizer(list_of_texts)` on `--reference-mb` MB of the first corpus,
   TOKENIZERS_PARALLELISM on, all cores) and their ratio; the cores other processes kept busy
   in an idle pause before each case (`--settle` s) and the machine during the run (a warning
   when others were busy: the timings are skewed then); every 0.2 s (`--interval`) the RSS
   and PSS (psutil memory_full_info) of the driver and of every descendant (Ray's gcs and
   raylet, its workers and actors): the driver's peak, and the peak of the sum over all the
   job's processes (RSS counts the object store's shared pages once per process that touched
   them, PSS splits them among those processes: the target uses the sum of PSS); bytes per
   stored token (the size of `<cache_dir>/tokenized` over the tokens stored there: the sets'
   meta.json, else the run's `data_tokens`); the whole job's wall
   time; validate's wall time.

Targets (PASS/FAIL, ratios side by side; MB and GB are 10^6 and 10^9 bytes): the driver's peak
RSS < 2 GB; the sum of the job's processes' PSS < 4 GB; <= 2.2 bytes per stored token;
tokenization >= 0.7x the tokenizer's own batch rate (1x cases); the sampled 10x case: the same
memory bounds and its whole job < 0.5x the 1x full job's (case a's, else b's) time; validate
on a 1x job < 60 s. The exit status is 0 whatever the targets say (a FAIL is a finding);
non-zero when the benchmark itself crashed.

    .venv/bin/python benchmarks/data_scale.py             # 4 corpora of 41M tokens, cases a b c
    .venv/bin/python benchmarks/data_scale.py --smoke     # tiny corpora, every case, 1-3 min
    .venv/bin/python benchmarks/data_scale.py --cases a,b --json /tmp/data_scale.json
    .venv/bin/python benchmarks/data_scale.py --smoke --source-form file   # today's reader
    .venv/bin/python benchmarks/data_scale.py --generate-only   # the corpora alone (cached)

`--source-form` says how a training set names its shards: `glob` (default:
`.../parquet/*.parquet`, `.../jsonl/*.jsonl.gz`), `folder` (the shards' folder), or `file`
(the first shard alone, with `format` set: what today's reader takes, for developing against
it; with `--shards 1` that is the whole corpus).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine_load.py
from machine_load import Sampling, busy_cores, machine_cpu, others_load  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SITE = Path(sysconfig.get_paths()["purelib"])
STDLIB = Path(sysconfig.get_paths()["stdlib"])
DEFAULT_CACHE = Path.home() / ".cache" / "untrac-ray-bench" / "data_scale"
FORMAT_VERSION = 1  # of the files written: a change regenerates them
MB, GB = 1e6, 1e9

TOKENS_PER_CORPUS = 41_000_000
SMOKE_TOKENS = 200_000
TEN_X = 10
SHARDS, SMOKE_SHARDS = 8, 2
ROW_GROUPS = 4
SAMPLE_ROWS, SMOKE_SAMPLE_ROWS = 10_000, 300
TEST_ROWS = 200
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
BLOCK_SIZE = 128
POOL_CHARS = 40_000_000  # at most this many characters of unique text per group
TOKENIZER_SAMPLE_CHARS = 4_000_000  # of each group's pool, to train the BPE on
MIN_CHARS, MAX_CHARS, MIN_WORDS = 40, 4000, 6
REFERENCE_MB, SMOKE_REFERENCE_MB = 20.0, 2.0
UNLEARN = {"optimizer": "adam", "learning_rate": 1e-4, "batch_size": 8, "max_steps": 10}

# Targets
DRIVER_TARGET = 2 * GB  # the driver's peak RSS
ALL_TARGET = 4 * GB  # the peak of the sum of PSS over all the job's processes
BYTES_TARGET = 2.2  # bytes per stored token
RATE_TARGET = 0.7  # data-stage tokens/s over the tokenizer's own batch rate (1x cases)
SAMPLED_TARGET = 0.5  # case c's whole job over the 1x full job's
VALIDATE_TARGET = 60.0  # seconds, validate on a 1x job

# Package groups: the corpora (`--corpora 4 | 8`); "*" takes every package no group names.
GROUPS: dict[int, dict[str, tuple[str, ...]]] = {
    4: {"numerics": ("numpy", "scipy", "pandas"),
        "torch": ("torch",),
        "hf": ("transformers", "tokenizers", "datasets", "huggingface_hub", "safetensors"),
        "others": ("ray", "mlflow", "*")},
    8: {"numpy": ("numpy",), "scipy": ("scipy",), "pandas": ("pandas",), "torch": ("torch",),
        "transformers": ("transformers",),
        "hub": ("tokenizers", "datasets", "huggingface_hub", "safetensors"),
        "ray": ("ray",), "others": ("mlflow", "*")},
}
TEST_GROUP = "stdlib"
SKIP_DIRS = {"tests", "test", "testing", "__pycache__", "_vendor", "vendor", "examples",
             "benchmarks"}
NOT_PACKAGES = {"__pycache__", "_distutils_hack", "pip", "setuptools", "pkg_resources",
                "_pytest", "pytest", "untrac_ray"}

CASES = {
    "a": "1x, all rows, Parquet shards",
    "b": "1x, all rows, gzipped JSONL shards",
    "c": "10x, sample_rows on each training set, Parquet shards",
}
DATA_STAGE = "> loading and tokenizing datasets"
OTHERS_WARNING = 0.3  # cores other processes keep busy: above it, the timings are skewed
BASE = "tokenizer+model+test set"  # the generation step before the corpora


# --- Text: docstrings and comments of installed packages ---


def is_prose(text: str) -> bool:
    """ASCII English prose: long enough, enough words, mostly letters and spaces."""
    if len(text) < MIN_CHARS or not text.isascii() or len(text.split()) < MIN_WORDS:
        return False
    if "http" in text or "copyright" in text.lower() or "license" in text.lower():
        return False
    return sum(c.isalpha() or c == " " for c in text) >= 0.7 * len(text)


def prose(text: str) -> str:
    """A docstring or comment block's prose paragraphs, joined (at most MAX_CHARS)."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if is_prose(para):
            kept.append(para)
    return "\n\n".join(kept)[:MAX_CHARS].strip()


def file_texts(path: Path) -> list[str]:
    """The rows of one source file: each docstring's prose and each comment block's."""
    try:
        source = path.read_text(encoding="utf-8", errors="replace")
        tree = ast.parse(source)
    except (SyntaxError, ValueError, OSError, RecursionError):
        return []
    raw = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                raw.append(doc)
    block: list[str] = []
    for line in source.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            block.append(stripped.lstrip("#").strip())
        elif block:
            raw.append(" ".join(block))
            block = []
    return [t for t in map(prose, raw) if t]


def python_files(folder: Path) -> Iterator[Path]:
    """A package's .py files in a fixed order (sorted walk, tests and vendored code left out)."""
    if folder.is_file():
        yield folder
        return
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(".py"):
                yield Path(here, name)


def packages_of(groups: dict[str, tuple[str, ...]], site: Path = SITE) -> dict[str, list[Path]]:
    """Each group's package folders under site-packages ("*": every top-level package folder
    no group names, sorted)."""
    named = {p for pkgs in groups.values() for p in pkgs if p != "*"}
    rest = sorted(p for p in site.iterdir() if p.is_dir() and p.name.isidentifier()
                  and p.name not in named and p.name not in NOT_PACKAGES
                  and not p.name.startswith("_") and (p / "__init__.py").exists())
    out = {}
    for group, pkgs in groups.items():
        folders: list[Path] = []
        for p in pkgs:
            folders += rest if p == "*" else [site / p] if (site / p).exists() else []
        out[group] = folders
    return out


def collect_pool(folders: list[Path], max_chars: int, seen: set[str]) -> list[str]:
    """Unique rows of the folders' files, read round-robin over the folders (one file of each
    in turn) until max_chars characters are held or the files are used up. `seen` holds the
    hashes of rows kept by other groups (a row goes to the first group that reads it)."""
    iters = [python_files(f) for f in folders]
    rows: list[str] = []
    chars = 0
    while iters and chars < max_chars:
        for it in list(iters):
            path = next(it, None)
            if path is None:
                iters.remove(it)
                continue
            for text in file_texts(path):
                key = hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
                if key in seen:
                    continue
                seen.add(key)
                rows.append(text)
                chars += len(text)
            if chars >= max_chars:
                break
    return rows


def collect_pools(corpora: int, max_chars: int, test_rows: int = TEST_ROWS,
                  site: Path = SITE) -> dict[str, list[str]]:
    """The corpora's pools of unique rows, and the test group's (the stdlib's) rows."""
    seen: set[str] = set()
    pools = {}
    for group, folders in packages_of(GROUPS[corpora], site).items():
        start = time.perf_counter()
        pools[group] = collect_pool(folders, max_chars, seen)
        chars = sum(map(len, pools[group]))
        print(f"  pool {group}: {len(pools[group]):,} rows, {chars / MB:.1f} MB of text from "
              f"{len(folders)} packages ({time.perf_counter() - start:.0f} s)", flush=True)
        if not pools[group]:
            raise SystemExit(f"no text found for group {group} under {site}")
    stdlib = [STDLIB / n for n in ("collections", "json", "logging", "email", "http",
                                   "importlib", "asyncio", "unittest")]
    pools[TEST_GROUP] = collect_pool(stdlib, MAX_CHARS * test_rows, seen)[:test_rows]
    return pools


# --- Tokenizer and model ---


def train_tokenizer(pools: dict[str, list[str]], sample_chars: int, folder: Path):
    """A 4,096-id byte-level BPE trained on the first sample_chars characters of each pool,
    saved as a transformers tokenizer folder; returns the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = []
    for group, rows in pools.items():
        if group == TEST_GROUP:
            continue
        chars = 0
        for row in rows:
            if chars >= sample_chars:
                break
            sample.append(row)
            chars += len(row)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, unk_token=EOS)
    fast.save_pretrained(folder)
    return fast


def row_tokens(tok, rows: list[str], batch: int = 4096) -> np.ndarray:
    """Tokens of each row as a `kind: text` set stores it: its BPE tokens + 1 end-of-text."""
    counts = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), batch):
        ids = tok(rows[start:start + batch], add_special_tokens=False)["input_ids"]
        counts[start:start + len(ids)] = [len(x) + 1 for x in ids]
    return counts


def save_model(folder: Path, tok) -> None:
    """A random GPT-2 of 2 layers, hidden 64, for the tokenizer, saved with it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=BLOCK_SIZE, n_embd=64, n_layer=2,
                        n_head=2, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    hf_logging.disable_progress_bar()
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


# --- Corpora: streaming shard writers ---


def corpus_rows(counts: np.ndarray, tokens: int, seed: int, corpus: int) -> Iterator[int]:
    """Row indices of the pool, pass after pass (each in its own seeded order), until `tokens`
    tokens are reached (the last row crosses it)."""
    total = 0
    rep = 0
    while True:
        order = np.random.default_rng([seed, corpus, rep]).permutation(len(counts))
        for i in order:
            yield int(i)
            total += int(counts[i])
            if total >= tokens:
                return
        rep += 1


@dataclass
class ShardStats:
    """What one corpus's writing produced."""

    rows: int = 0
    tokens: int = 0
    chars: int = 0
    shards: int = 0
    parquet_bytes: int = 0
    jsonl_bytes: int = 0


class ShardWriter:
    """Writes one corpus as Parquet shards (and gzipped JSONL shards with `jsonl`): rows are
    buffered one row group at a time; a shard closes once it holds tokens / shards tokens."""

    def __init__(self, folder: Path, tokens: int, shards: int, row_groups: int,
                 jsonl: bool) -> None:
        import pyarrow as pa

        self.pa = pa
        self.folder, self.shards, self.jsonl = folder, shards, jsonl
        self.shard_tokens = max(1, -(-tokens // shards))
        self.group_tokens = max(1, -(-self.shard_tokens // row_groups))
        self.schema = pa.schema([("text", pa.string())])
        self.stats = ShardStats()
        self._buffer: list[str] = []
        self._buffer_tokens = 0
        self._shard_tokens = 0
        self._closed = 0
        self._parquet = self._gzip = None
        for sub in ("parquet", "jsonl") if jsonl else ("parquet",):
            (folder / sub).mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        import pyarrow.parquet as pq

        name = f"part-{self.stats.shards:05d}"
        self._parquet = pq.ParquetWriter(self.folder / "parquet" / f"{name}.parquet",
                                         self.schema, compression="snappy")
        if self.jsonl:
            raw = gzip.GzipFile(self.folder / "jsonl" / f"{name}.jsonl.gz", "wb",
                                compresslevel=6, mtime=0)  # mtime 0: the same bytes each time
            self._gzip = io.TextIOWrapper(raw, encoding="utf-8")
        self.stats.shards += 1

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._parquet is None:
            self._open()
        self._parquet.write_table(self.pa.table({"text": self._buffer}, schema=self.schema))
        if self._gzip is not None:
            self._gzip.write("".join(json.dumps({"text": t}) + "\n" for t in self._buffer))
        self._buffer, self._buffer_tokens = [], 0

    def _close_shard(self) -> None:
        self._flush()
        if self._parquet is not None:
            self._parquet.close()
        if self._gzip is not None:
            self._gzip.close()
        self._parquet = self._gzip = None
        self._shard_tokens = 0
        self._closed += 1

    def add(self, text: str, tokens: int) -> None:
        self._buffer.append(text)
        self._buffer_tokens += tokens
        self._shard_tokens += tokens
        self.stats.rows += 1
        self.stats.tokens += tokens
        self.stats.chars += len(text)
        if self._shard_tokens >= self.shard_tokens and self._closed < self.shards - 1:
            self._close_shard()  # the last shard takes what is left
        elif self._buffer_tokens >= self.group_tokens:
            self._flush()

    def close(self) -> ShardStats:
        self._close_shard()
        self.stats.parquet_bytes = folder_bytes(self.folder / "parquet")
        if self.jsonl:
            self.stats.jsonl_bytes = folder_bytes(self.folder / "jsonl")
        return self.stats


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def write_corpus(folder: Path, pool: list[str], counts: np.ndarray, tokens: int, seed: int,
                 corpus: int, shards: int, row_groups: int, jsonl: bool,
                 label: str = "") -> ShardStats:
    """One corpus of `tokens` tokens from its pool, streamed into shards; prints progress."""
    if folder.exists():
        shutil.rmtree(folder)
    writer = ShardWriter(folder, tokens, shards, row_groups, jsonl)
    start = last = time.perf_counter()
    for i in corpus_rows(counts, tokens, seed, corpus):
        writer.add(pool[i], int(counts[i]))
        now = time.perf_counter()
        if now - last >= 10:
            last = now
            print(f"    {label}: {writer.stats.tokens / 1e6:.1f}M / {tokens / 1e6:.1f}M tokens, "
                  f"shard {writer.stats.shards}/{shards}, {now - start:.0f} s", flush=True)
    return writer.close()


# --- The cache: base (pools' tokenizer, model, test set) and corpora, reused by marker ---


@dataclass
class CorpusParams:
    """What the generated files depend on (the marker's parameters)."""

    corpora: int
    tokens_per_corpus: int
    shards: int
    row_groups: int
    seed: int
    pool_chars: int
    tokenizer_sample_chars: int
    version: int = FORMAT_VERSION

    def base_key(self) -> dict[str, Any]:
        """The parameters the pools, the tokenizer and the model depend on."""
        return {"corpora": self.corpora, "pool_chars": self.pool_chars, "seed": self.seed,
                "tokenizer_sample_chars": self.tokenizer_sample_chars,
                "version": self.version, "vocab": VOCAB_SIZE, "test_rows": TEST_ROWS}

    def size_key(self, scale: int) -> dict[str, Any]:
        return {**self.base_key(), "tokens_per_corpus": self.tokens_per_corpus * scale,
                "shards": self.shards, "row_groups": self.row_groups, "jsonl": scale == 1}

    def root(self, cache: Path) -> Path:
        digest = hashlib.sha1(json.dumps(self.base_key(), sort_keys=True).encode()).hexdigest()
        return cache / f"corpora{self.corpora}-{digest[:10]}"


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "marker.json").read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, params: dict[str, Any], results: dict[str, Any]) -> None:
    (folder / "marker.json").write_text(json.dumps({"params": params, **results}, indent=1))


@dataclass
class Corpora:
    """The generated files of one run of the benchmark."""

    root: Path
    names: list[str]
    model: Path
    test: Path
    generation_seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # "1x" -> corpus -> stats
    reused: dict[str, bool] = field(default_factory=dict)

    def shard_folder(self, scale: int, corpus: str, form: str) -> Path:
        return self.root / f"{scale}x" / corpus / form


class Generator:
    """Makes (or reuses) the base files and the corpora of each size, under `cache`."""

    def __init__(self, cache: Path, params: CorpusParams) -> None:
        self.cache, self.params = cache, params
        self.root = params.root(cache)
        self._pools: dict[str, list[str]] | None = None
        self._counts: dict[str, np.ndarray] = {}
        self._tok = None
        self.out = Corpora(self.root, list(GROUPS[params.corpora]), self.root / "model",
                           self.root / "test.jsonl")

    def pools(self) -> dict[str, list[str]]:
        if self._pools is None:
            start = time.perf_counter()
            print(f"collecting text from {SITE} ...", flush=True)
            self._pools = collect_pools(self.params.corpora, self.params.pool_chars)
            self.out.generation_seconds["text"] = time.perf_counter() - start
        return self._pools

    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.root / "model")
        return self._tok

    def counts(self, group: str) -> np.ndarray:
        if group not in self._counts:
            start = time.perf_counter()
            self._counts[group] = row_tokens(self.tokenizer(), self.pools()[group])
            self.out.generation_seconds.setdefault("pool tokens", 0.0)
            self.out.generation_seconds["pool tokens"] += time.perf_counter() - start
        return self._counts[group]

    def ensure_base(self) -> None:
        """The tokenizer, the model folder and the test set."""
        key = self.params.base_key()
        marker = read_marker(self.root)
        if marker and marker["params"] == key and (self.root / "model").exists():
            self.out.reused[BASE] = True
            self.out.generation_seconds[BASE] = marker.get("seconds", 0.0)
            return
        self.out.reused[BASE] = False
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        pools = self.pools()
        start = time.perf_counter()
        tok = train_tokenizer(pools, self.params.tokenizer_sample_chars, self.root / "tokenizer")
        save_model(self.root / "model", tok)
        with self.out.test.open("w") as f:
            for text in pools[TEST_GROUP]:
                f.write(json.dumps({"text": text}) + "\n")
        seconds = time.perf_counter() - start
        self.out.generation_seconds[BASE] = seconds
        print(f"  tokenizer ({len(tok):,} ids), model and test set ({len(pools[TEST_GROUP])} "
              f"rows) written in {seconds:.0f} s", flush=True)
        write_marker(self.root, key, {"seconds": seconds})

    def ensure_size(self, scale: int) -> None:
        """The corpora of one size (1 or 10 times tokens_per_corpus), in their forms."""
        folder = self.root / f"{scale}x"
        key = self.params.size_key(scale)
        marker = read_marker(folder)
        label = f"{scale}x"
        if marker and marker["params"] == key:
            self.out.reused[label] = True
            self.out.stats[label] = marker["stats"]
            self.out.generation_seconds[label] = marker["seconds"]
            return
        self.out.reused[label] = False
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        tokens = self.params.tokens_per_corpus * scale
        forms = "Parquet and gzipped JSONL" if scale == 1 else "Parquet"
        print(f"writing the {label} corpora: {len(self.out.names)} x {tokens:,} tokens, "
              f"{self.params.shards} shards of {self.params.row_groups} row groups, {forms} "
              "...", flush=True)
        counts = {name: self.counts(name) for name in self.out.names}
        start = time.perf_counter()
        stats = {}
        for index, name in enumerate(self.out.names):
            t0 = time.perf_counter()
            s = write_corpus(folder / name, self.pools()[name], counts[name], tokens,
                             self.params.seed, index, self.params.shards,
                             self.params.row_groups, jsonl=scale == 1, label=f"{label} {name}")
            stats[name] = asdict(s)
            print(f"  {label} {name}: {s.rows:,} rows, {s.tokens:,} tokens, {s.chars / MB:,.0f}"
                  f" MB of text in {s.shards} shards; Parquet {s.parquet_bytes / MB:,.0f} MB"
                  + (f", JSONL.gz {s.jsonl_bytes / MB:,.0f} MB" if scale == 1 else "")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        seconds = time.perf_counter() - start
        self.out.stats[label] = stats
        self.out.generation_seconds[label] = seconds
        print(f"  the {label} corpora written in {seconds:.0f} s", flush=True)
        write_marker(folder, key, {"stats": stats, "seconds": seconds})


def generate(cache: Path, params: CorpusParams, scales: list[int]) -> Corpora:
    """The base files and the corpora of each asked size, made or reused."""
    gen = Generator(cache, params)
    gen.ensure_base()
    for scale in scales:
        gen.ensure_size(scale)
    return gen.out


# --- The job ---


def source_of(corpora: Corpora, scale: int, corpus: str, form: str,
              source_form: str) -> dict[str, str]:
    """A training set's `source` (and `format` for the `file` form)."""
    folder = corpora.shard_folder(scale, corpus, form)
    suffix = ".parquet" if form == "parquet" else ".jsonl.gz"
    if source_form == "glob":
        return {"source": str(folder / f"*{suffix}")}
    if source_form == "folder":
        return {"source": str(folder)}
    return {"source": str(folder / f"part-00000{suffix}"),
            "format": "parquet" if form == "parquet" else "jsonl"}


def write_job(folder: Path, corpora: Corpora, case: str, source_form: str,
              sample_rows: int, cache_uri_root: Path) -> Path:
    """runs/<case>/job.yaml for a case."""
    scale, form = (TEN_X, "parquet") if case == "c" else (1, "jsonl" if case == "b" else "parquet")
    train = []
    for name in corpora.names:
        ds = {"name": name, **source_of(corpora, scale, name, form, source_form), "kind": "text"}
        if case == "c":
            ds.update({"sample_rows": sample_rows, "sample_seed": 0})
        train.append(ds)
    job = {
        "name": f"data-scale-{case}",
        "model": {"path": str(corpora.model)},
        "tokenizer": {"block_size": BLOCK_SIZE},
        "data": {"train": train,
                 "test": [{"name": "heldout", "source": str(corpora.test), "kind": "text"}]},
        "methods": {"untrac": dict(UNLEARN), "untrac_inv": dict(UNLEARN)},
        "evaluation": {"batch_size": 32, "max_examples": 64},
        "resources": {"num_actors": 2, "cpus_per_actor": 1, "local_cpus": 2},
        "tracking": {"uri": f"sqlite:///{cache_uri_root / 'mlflow.db'}",
                     "experiment": f"data-scale-{case}"},
        "cache_dir": str(folder / "cache"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


# --- Memory of a process tree ---


@dataclass
class TreeMemory:
    """Peaks over the samples of a process and its descendants (bytes)."""

    driver_rss: int = 0
    driver_pss: int | None = None
    sum_rss: int = 0
    sum_pss: int | None = None
    processes: int = 0  # the most processes seen in one sample
    pss_unreadable: int = 0  # samples of a process whose PSS could not be read
    samples: int = 0


def process_memory(proc: psutil.Process) -> tuple[int, int | None]:
    """(RSS, PSS or None where unreadable) of one process."""
    try:
        info = proc.memory_full_info()
        return info.rss, getattr(info, "pss", None)
    except psutil.AccessDenied:
        return proc.memory_info().rss, None


class TreeSampler(Sampling):
    """Samples, every `interval` seconds in a thread, the RSS and PSS of a process and of all
    its descendants; keeps the driver's peaks and the peaks of the sums."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.memory = TreeMemory()
        self.start_sampling()

    def sample(self) -> None:
        root = psutil.Process(self.pid)
        m = self.memory
        rss, pss = process_memory(root)
        m.driver_rss = max(m.driver_rss, rss)
        if pss is not None:
            m.driver_pss = max(m.driver_pss or 0, pss)
        total_rss, total_pss, n, unreadable = rss, pss or 0, 1, pss is None
        for child in root.children(recursive=True):
            try:
                c_rss, c_pss = process_memory(child)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            total_rss += c_rss
            n += 1
            if c_pss is None:
                unreadable = True
            else:
                total_pss += c_pss
        m.sum_rss = max(m.sum_rss, total_rss)
        m.processes = max(m.processes, n)
        m.pss_unreadable += unreadable
        if not unreadable:
            m.sum_pss = max(m.sum_pss or 0, total_pss)
        m.samples += 1


# --- A case: validate and run ---


@dataclass
class CaseResult:
    """One case's figures (None: not measured)."""

    case: str
    label: str
    refused: str | None = None  # "validate: <the error line>" or "run: ..."
    validate_seconds: float | None = None
    run_seconds: float | None = None
    data_seconds: float | None = None
    data_tokens: int | None = None
    data_from: str = ""  # "mlflow" | "log"
    stored_tokens: int | None = None
    stored_bytes: int | None = None
    stored_from: str = ""  # "meta.json" | "data_tokens"
    memory: TreeMemory = field(default_factory=TreeMemory)
    validate_memory: TreeMemory = field(default_factory=TreeMemory)
    reference: Reference | None = None  # the tokenizer's rate, measured just before the case
    others: float | None = None  # cores others kept busy in an idle pause before the case
    busy: float | None = None  # cores the whole machine kept busy during the run
    log: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        if self.data_seconds and self.data_tokens:
            return self.data_tokens / self.data_seconds
        return None

    @property
    def bytes_per_token(self) -> float | None:
        if self.stored_bytes is not None and self.stored_tokens:
            return self.stored_bytes / self.stored_tokens
        return None


def subprocess_env() -> dict[str, str]:
    """The CLI's environment: this checkout's untrac_ray first, offline Hugging Face."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "")
                                                       .split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


@dataclass
class CliRun:
    """One `untrac-ray` subprocess: its exit status, wall seconds, output lines (seconds since
    its start, line), its process tree's memory, and the cores the machine kept busy."""

    rc: int
    seconds: float
    lines: list[tuple[float, str]]
    memory: TreeMemory
    busy: float | None


def run_cli(args: list[str], log: Path, interval: float) -> CliRun:
    """`untrac-ray <args>` as a subprocess, its output kept in `log` and timestamped, its
    process tree sampled."""
    lines: list[tuple[float, str]] = []
    ticks, start = machine_cpu(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "untrac_ray.cli", *args], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    with log.open("w") as out, TreeSampler(proc.pid, interval) as sampler:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            out.write(line)
        proc.wait()
    return CliRun(proc.returncode, time.perf_counter() - start, lines, sampler.memory,
                  busy_cores(ticks, machine_cpu()))


def refusal(lines: list[tuple[float, str]]) -> str:
    """The line that says why a command failed: its last `error:` line, else its last line."""
    texts = [t.strip() for _, t in lines if t.strip()]
    errors = [t for t in texts if t.startswith("error:")]
    return (errors or texts or ["(no output)"])[-1]


def stage_seconds(lines: list[tuple[float, str]], stage: str = DATA_STAGE) -> float | None:
    """Seconds from the stage's line to the next stage line ("> ...") or the tasks' line."""
    begun = None
    for t, text in lines:
        if begun is None:
            if text.startswith(stage):
                begun = t
        elif text.startswith(("> ", "tasks:")):
            return t - begun
    return None


def stored_tokens(tokenized: Path) -> int | None:
    """Tokens stored in a tokenized cache (the `tokens` of each set folder's meta.json, as
    untrac_ray/inputs/token_store.py writes it), None when it holds no set."""
    total, found = 0, False
    for meta in sorted(tokenized.glob("*/meta.json")):
        try:
            total += int(json.loads(meta.read_text(encoding="utf-8"))["tokens"])
        except (OSError, ValueError, KeyError):  # not a set's folder: the run's data_tokens
            return None
        found = True
    return total if found else None


def mlflow_metrics(uri: str, experiment: str) -> dict[str, float]:
    """The newest run's metrics of an experiment ({} when none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=1)
    return dict(runs[0].data.metrics) if runs else {}


def run_case(case: str, job: Path, interval: float, reference: Reference | None = None,
             others: float | None = None) -> CaseResult:
    """validate then run one case's job; the refusal line when either refuses."""
    folder = job.parent
    spec = yaml.safe_load(job.read_text())
    result = CaseResult(case, CASES[case], reference=reference, others=others,
                        log=str(folder / "run.log"))
    shutil.rmtree(spec["cache_dir"], ignore_errors=True)
    print(f"case {case} ({CASES[case]}): validate ...", flush=True)
    done = run_cli(["validate", str(job)], folder / "validate.log", interval)
    result.validate_seconds, result.validate_memory = done.seconds, done.memory
    if done.rc != 0:
        result.refused = f"validate: {refusal(done.lines)}"
        print(f"  refused: {result.refused}", flush=True)
        return result
    print(f"case {case}: validate {done.seconds:.1f} s; run ...", flush=True)
    uri = spec["tracking"]["uri"]
    done = run_cli(["run", str(job), "--tracking-uri", uri], folder / "run.log", interval)
    result.run_seconds, result.memory, result.busy = done.seconds, done.memory, done.busy
    lines = done.lines
    if done.rc != 0:
        result.refused = f"run: {refusal(lines)}"
        print(f"  refused: {result.refused}", flush=True)
        return result
    metrics = mlflow_metrics(uri, spec["tracking"]["experiment"])
    if "data_seconds" in metrics and "data_tokens" in metrics:
        result.data_seconds, result.data_tokens = metrics["data_seconds"], int(
            metrics["data_tokens"])
        result.data_from = "mlflow"
    tokenized = Path(spec["cache_dir"]) / "tokenized"
    counted = stored_tokens(tokenized) if tokenized.exists() else None
    if result.data_from != "mlflow":
        result.data_seconds, result.data_tokens = stage_seconds(lines), counted
        result.data_from = "log"
    if tokenized.exists():
        result.stored_bytes = folder_bytes(tokenized)
        if counted is not None:
            result.stored_tokens, result.stored_from = counted, "meta.json"
        elif result.data_tokens:
            result.stored_tokens, result.stored_from = result.data_tokens, "data_tokens"
    print(f"case {case}: run {done.seconds:.1f} s", flush=True)
    return result


# --- The tokenizer's own batch rate ---


@dataclass
class Reference:
    """The tokenizer's own rate on texts of the first corpus."""

    texts: int
    chars: int
    tokens: int
    seconds: float
    threads: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def reference_texts(parquet_folder: Path, max_bytes: float) -> list[str]:
    """Rows of a corpus's Parquet shards, in order, until max_bytes bytes of text."""
    import pyarrow.parquet as pq

    texts: list[str] = []
    size = 0
    for path in sorted(parquet_folder.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=4096):
            for t in batch.column(0).to_pylist():
                texts.append(t)
                size += len(t.encode())
                if size >= max_bytes:
                    return texts
    return texts


def tokenizer_rate(model: Path, texts: list[str]) -> Reference:
    """tokenizer(texts) in one call, TOKENIZERS_PARALLELISM on (all cores), timed after a
    small warm-up call."""
    from transformers import AutoTokenizer

    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # here only: the job gets the caller's
    try:
        tok = AutoTokenizer.from_pretrained(model)
        tok(texts[:256])
        start = time.perf_counter()
        ids = tok(texts)["input_ids"]
        seconds = time.perf_counter() - start
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return Reference(len(texts), sum(map(len, texts)), sum(map(len, ids)), seconds,
                     os.cpu_count() or 1)


# --- The report ---


@dataclass
class Check:
    """One target of one case: the value, what it is held against, and the verdict."""

    case: str
    name: str
    value: str
    target: str
    ok: bool | None  # None: not measured


def fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MB:,.0f} MB"


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def checks(results: dict[str, CaseResult], reference: Reference | None) -> list[Check]:
    """Every target of every case, with its verdict (None where the figure is missing)."""
    out = []
    full = next((results[c] for c in ("a", "b") if c in results
                 and results[c].run_seconds is not None and not results[c].refused), None)
    for case, r in results.items():
        if r.refused:
            out.append(Check(case, "refused", r.refused, "-", None))
            continue
        ref = r.reference or reference
        m = r.memory
        out.append(Check(case, "driver peak RSS", fmt_bytes(m.driver_rss),
                         f"< {DRIVER_TARGET / GB:.0f} GB", m.driver_rss < DRIVER_TARGET))
        out.append(Check(case, "all processes, peak sum PSS", fmt_bytes(m.sum_pss),
                         f"< {ALL_TARGET / GB:.0f} GB",
                         None if m.sum_pss is None else m.sum_pss < ALL_TARGET))
        if case in ("a", "b"):
            bpt = r.bytes_per_token
            out.append(Check(case, "bytes per stored token", fmt(bpt), f"<= {BYTES_TARGET}",
                             None if bpt is None else bpt <= BYTES_TARGET))
            rate = r.tokens_per_s
            ratio = rate / ref.tokens_per_s if rate and ref else None
            out.append(Check(case, "tokenization / tokenizer's batch rate",
                             f"{fmt(rate, ',.0f')} / "
                             f"{fmt(ref and ref.tokens_per_s, ',.0f')} tok/s = "
                             f"{fmt(ratio)}x", f">= {RATE_TARGET}x",
                             None if ratio is None else ratio >= RATE_TARGET))
            out.append(Check(case, "validate wall time", fmt(r.validate_seconds, ".1f", " s"),
                             f"< {VALIDATE_TARGET:.0f} s", r.validate_seconds < VALIDATE_TARGET))
        else:
            ratio = r.run_seconds / full.run_seconds if full and r.run_seconds else None
            base = f"case {full.case}'s {full.run_seconds:.1f} s" if full else "no 1x full job"
            out.append(Check(case, "whole job / 1x full job",
                             f"{fmt(r.run_seconds, '.1f', ' s')} / {base} = {fmt(ratio)}x",
                             f"< {SAMPLED_TARGET}x",
                             None if ratio is None else ratio < SAMPLED_TARGET))
    return out


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def print_case(r: CaseResult, reference: Reference | None) -> None:
    """One case's figures."""
    reference = r.reference or reference
    print(f"\n== case {r.case}: {r.label}")
    if r.reference:
        print(f"  {describe_reference(r.reference)}, measured just before")
    if r.others is not None or r.busy is not None:
        during = "" if r.busy is None else f"; the machine {r.busy:.2f} cores during the run"
        print(f"  load: others kept {fmt(r.others)} cores busy in a pause before the case"
              + during)
        if r.others is not None and r.others > OTHERS_WARNING:
            print(f"  warning: other processes kept {r.others:.2f} cores busy: the timings are "
                  "skewed; rerun on a quiet machine")
    print(f"  validate: {fmt(r.validate_seconds, '.1f', ' s')} (peak RSS of its tree "
          f"{fmt_bytes(r.validate_memory.sum_rss)})")
    if r.refused:
        print(f"  refused: {r.refused}")
        return
    m = r.memory
    rate = r.tokens_per_s
    ratio = rate / reference.tokens_per_s if rate and reference else None
    source = ("the run's metrics" if r.data_from == "mlflow" else
              "the log: up to the next stage line, so with Ray's start today; tokens stored")
    print(f"  whole job: {r.run_seconds:.1f} s; data stage ({source}): "
          f"{fmt(r.data_seconds, '.1f', ' s')}, {fmt(r.data_tokens, ',')} tokens, "
          f"{fmt(rate, ',.0f')} tokens/s = {fmt(ratio)}x the tokenizer's batch rate")
    print(f"  memory ({m.samples} samples, up to {m.processes} processes): driver peak RSS "
          f"{fmt_bytes(m.driver_rss)}, PSS {fmt_bytes(m.driver_pss)}; all processes, peak of "
          f"the sum: RSS {fmt_bytes(m.sum_rss)}, PSS {fmt_bytes(m.sum_pss)} (the target's)"
          + (f"; PSS unreadable in {m.pss_unreadable} samples" if m.pss_unreadable else ""))
    print(f"  tokenized cache: {fmt_bytes(r.stored_bytes)} for {fmt(r.stored_tokens, ',')} "
          f"stored tokens ({r.stored_from or 'n/a'}) = {fmt(r.bytes_per_token)} bytes a token")


def describe_reference(ref: Reference) -> str:
    return (f"the tokenizer's own batch rate: {ref.tokens:,} tokens of {ref.texts:,} texts "
            f"({ref.chars / MB:.1f} MB) in {ref.seconds:.2f} s = {ref.tokens_per_s:,.0f} "
            f"tokens/s (TOKENIZERS_PARALLELISM on, {ref.threads} cores)")


def print_report(results: dict[str, CaseResult], reference: Reference | None) -> list[Check]:
    """Each case's figures, then every target side by side with its verdict."""
    if reference:
        print(f"\n== {describe_reference(reference)}")
    for r in results.values():
        print_case(r, reference)
    rows = checks(results, reference)
    print("\n== targets")
    width = max((len(c.name) for c in rows), default=10)
    for c in rows:
        value = c.value if len(c.value) <= 100 else c.value[:97] + "..."
        print(f"  {c.case}  {c.name:<{width}}  {value:<48} {c.target:<10} {verdict(c.ok)}")
    return rows


# --- Main ---


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny corpora ({SMOKE_TOKENS:,} tokens, {SMOKE_SHARDS} shards), "
                             "every case, 1-3 minutes")
    parser.add_argument("--cases", default="a,b,c", help="which of a, b, c (comma-separated)")
    parser.add_argument("--corpora", type=int, choices=sorted(GROUPS), default=4)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where the corpora, the model, the runs and mlflow.db go")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--tokens-per-corpus", type=int,
                        help=f"default {TOKENS_PER_CORPUS:,} (smoke {SMOKE_TOKENS:,})")
    parser.add_argument("--shards", type=int, help=f"default {SHARDS} (smoke {SMOKE_SHARDS})")
    parser.add_argument("--row-groups", type=int, default=ROW_GROUPS, help="per Parquet shard")
    parser.add_argument("--sample-rows", type=int,
                        help=f"case c's sample_rows (default {SAMPLE_ROWS:,}, smoke "
                             f"{SMOKE_SAMPLE_ROWS})")
    parser.add_argument("--seed", type=int, default=0, help="the corpora's row orders")
    parser.add_argument("--pool-chars", type=int,
                        help=f"unique text per group (default {POOL_CHARS:,}; with small "
                             "corpora at most 8 characters a token asked)")
    parser.add_argument("--source-form", choices=["glob", "folder", "file"], default="glob")
    parser.add_argument("--reference-mb", type=float,
                        help=f"text for the tokenizer's rate (default {REFERENCE_MB:.0f}, "
                             f"smoke {SMOKE_REFERENCE_MB:.0f})")
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling period, s")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of idling before each case, to measure the load of other "
                             "processes (not timed)")
    parser.add_argument("--generate-only", action="store_true",
                        help="make (or reuse) the corpora the cases need, print how long it "
                             "took, and stop")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}: give some of {', '.join(CASES)}")
    smoke = args.smoke
    if args.tokens_per_corpus is None:
        args.tokens_per_corpus = SMOKE_TOKENS if smoke else TOKENS_PER_CORPUS
    if args.shards is None:
        args.shards = SMOKE_SHARDS if smoke else SHARDS
    if args.sample_rows is None:
        args.sample_rows = SMOKE_SAMPLE_ROWS if smoke else SAMPLE_ROWS
    if args.reference_mb is None:
        args.reference_mb = SMOKE_REFERENCE_MB if smoke else REFERENCE_MB
    if args.pool_chars is None:
        args.pool_chars = min(POOL_CHARS, 8 * args.tokens_per_corpus)
    return args


def corpus_params(args: argparse.Namespace) -> CorpusParams:
    return CorpusParams(corpora=args.corpora, tokens_per_corpus=args.tokens_per_corpus,
                        shards=args.shards, row_groups=args.row_groups, seed=args.seed,
                        pool_chars=args.pool_chars,
                        tokenizer_sample_chars=min(TOKENIZER_SAMPLE_CHARS, args.pool_chars))


def print_header(args: argparse.Namespace, corpora: Corpora) -> None:
    vm = psutil.virtual_memory()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {vm.total / GB:.1f} GB "
          "memory; load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"corpora under {corpora.root}: {len(corpora.names)} x {args.tokens_per_corpus:,} "
          f"tokens (1x), {args.shards} shards x {args.row_groups} row groups; sources as "
          f"{args.source_form}; case c: sample_rows {args.sample_rows:,}")
    spent = {k: v for k, v in corpora.generation_seconds.items() if not corpora.reused.get(k)}
    print("  generation: " + ", ".join(
        f"{k} {v:.0f} s" + (" (reused: made earlier)" if corpora.reused.get(k) else "")
        for k, v in corpora.generation_seconds.items())
        + f"; this run {sum(spent.values()):.0f} s")
    print(f"job: tiny GPT-2 (2 layers, hidden 64, vocab {VOCAB_SIZE}), block_size {BLOCK_SIZE}"
          f", untrac + untrac_inv {UNLEARN}, 2 actors x 1 CPU; memory sampled every "
          f"{args.interval} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = args.cache.expanduser().resolve()
    if cache == REPO or REPO in cache.parents:
        raise SystemExit(f"--cache {cache} is inside the repository; give a folder outside it")
    cache.mkdir(parents=True, exist_ok=True)
    scales = [1] + ([TEN_X] if "c" in args.cases else [])
    corpora = generate(cache, corpus_params(args), scales)
    print_header(args, corpora)
    if args.generate_only:
        return 0

    texts = reference_texts(corpora.shard_folder(1, corpora.names[0], "parquet"),
                            args.reference_mb * MB)
    print(f"the tokenizer's own rate on {len(texts):,} texts ...", flush=True)
    reference = tokenizer_rate(corpora.model, texts)
    results = {}
    for case in args.cases:
        job = write_job(cache / "runs" / case, corpora, case, args.source_form,
                        args.sample_rows, cache)
        others = others_load(args.settle)
        # the tokenizer's rate again just before each 1x case: the machine's load drifts
        ref = tokenizer_rate(corpora.model, texts) if case in ("a", "b") else None
        results[case] = run_case(case, job, args.interval, ref, others)
    del texts
    rows = print_report(results, reference)
    if args.json:
        figures = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "corpora": {"root": str(corpora.root), "names": corpora.names,
                        "generation_seconds": corpora.generation_seconds,
                        "reused": corpora.reused, "stats": corpora.stats},
            "reference": {**asdict(reference), "tokens_per_s": reference.tokens_per_s},
            "cases": {c: {**asdict(r), "tokens_per_s": r.tokens_per_s,
                          "bytes_per_token": r.bytes_per_token} for c, r in results.items()},
            "checks": [asdict(c) for c in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
