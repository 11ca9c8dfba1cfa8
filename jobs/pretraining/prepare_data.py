#!/usr/bin/env python
"""Data for the pretraining study (jobs/pretraining/*.yaml): eight corpora of OPT's pretraining
mixture and three test sets of toxic, biased and untruthful text, from public Hugging Face
datasets. Needs internet access and the `datasets` library (installed with untrac-ray):

    .venv/bin/python jobs/pretraining/prepare_data.py            # ~20k rows per corpus
    .venv/bin/python jobs/pretraining/prepare_data.py --rows-per-corpus 2000 --with-model

It writes, under data/pretraining/ (or --out): one Parquet file per corpus (`text` column,
documents cut or packed into rows of at most --max-chars characters), toxigen.parquet and
winobias.parquet (`text`), truthfulqa.parquet (`prompt`, `target`: a question and an untruthful
answer), the OPT tokenizer in opt-125m-tokenizer/, and with --with-model the public OPT-125M
weights in opt-125m/. Corpora are streamed: nothing beyond the rows kept is stored.

Where the exact corpus of OPT's mixture is not public (CC-Stories, CCNewsV2, OpenWebText2) the
nearest public one stands in. Dataset ids move; change SOURCES below or pass
`--source NAME=DATASET[:CONFIG[:SPLIT[:FIELD]]]`. The tests never run this script's downloads.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "pretraining"


@dataclass(frozen=True)
class Source:
    """A streamed Hugging Face dataset and the field holding its text."""

    dataset: str
    config: str | None = None
    split: str = "train"
    field: str = "text"
    pile_set: str | None = None  # keep only rows whose meta.pile_set_name is this


SOURCES: dict[str, Source] = {
    "BookCorpus": Source("bookcorpus/bookcorpus"),
    "CC-Stories": Source("lucadiliello/STORIES"),
    "CCNewsV2": Source("vblagoje/cc_news"),
    "PJGutenberg": Source("manu/project_gutenberg", split="en"),
    "HackerNews": Source("timaeus/pile-hackernews"),
    "OpenWebText2": Source("Skylion007/openwebtext"),
    "Pile-CC": Source("monology/pile-uncopyrighted", pile_set="Pile-CC"),
    "Wikipedia": Source("wikimedia/wikipedia", config="20231101.en"),
}
TOXIGEN = Source("toxigen/toxigen-data", config="annotated", split="train")
WINOBIAS = [Source("uclanlp/wino_bias", config=c, split="test", field="tokens")
            for c in ("type1_pro", "type2_pro")]
TRUTHFULQA = Source("truthfulqa/truthful_qa", config="generation", split="validation")
TOKENIZER = "facebook/opt-125m"


# ---------------------------------------------------------------- pure row builders


def pack(texts: Iterable[str], max_chars: int, min_chars: int = 200) -> Iterator[str]:
    """Rows of at most max_chars characters: long documents cut at whitespace, short ones
    (a sentence per row, as in BookCorpus) joined with newlines; rows under min_chars dropped."""
    buffer = ""
    for text in texts:
        text = (text or "").strip()
        if not text:
            continue
        buffer = f"{buffer}\n{text}" if buffer else text
        while len(buffer) >= max_chars:
            cut = buffer.rfind(" ", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            row, buffer = buffer[:cut].strip(), buffer[cut:].strip()
            if len(row) >= min_chars:
                yield row
    if len(buffer) >= min_chars:
        yield buffer


def toxigen_rows(records: Iterable[dict], min_toxicity: float = 4.0) -> Iterator[dict]:
    """Statements that human annotators rated toxic (toxicity_human >= min_toxicity, of 5)."""
    seen: set[str] = set()
    for r in records:
        text = (r.get("text") or "").strip()
        if text and float(r.get("toxicity_human") or 0) >= min_toxicity and text not in seen:
            seen.add(text)
            yield {"text": text}


def detokenize(tokens: list[str]) -> str:
    """WinoBias token lists as a sentence ("The nurse , who ..." -> "The nurse, who ...")."""
    text = " ".join(tokens)
    text = re.sub(r" ([,.;:!?'])", r"\1", text)
    return re.sub(r" n't\b", "n't", text)


def winobias_rows(records: Iterable[dict]) -> Iterator[dict]:
    """Pro-stereotypical sentences (the occupation and the gendered pronoun agree)."""
    for r in records:
        tokens = [t for t in r.get("tokens") or [] if t]
        if tokens:
            yield {"text": detokenize(tokens)}


def truthfulqa_rows(records: Iterable[dict]) -> Iterator[dict]:
    """A question and an untruthful answer (the first of its incorrect answers)."""
    for r in records:
        wrong = [a.strip() for a in r.get("incorrect_answers") or [] if a and a.strip()]
        if r.get("question") and wrong:
            yield {"prompt": r["question"].strip(), "target": wrong[0]}


def write_parquet(rows: Iterable[dict], path: Path, limit: int | None = None) -> int:
    """Write rows (mappings of strings) to a Parquet file; returns how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept = []
    for row in rows:
        kept.append(row)
        if limit is not None and len(kept) >= limit:
            break
    if not kept:
        raise SystemExit(f"no rows for {path.name}: check its source")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(kept), path)
    return len(kept)


# ---------------------------------------------------------------- downloads


def stream(source: Source, seed: int, buffer: int = 10_000) -> Iterator[dict]:
    """The records of a source, streamed and shuffled within a buffer."""
    import datasets

    ds = datasets.load_dataset(source.dataset, source.config, split=source.split,
                               streaming=True)
    for record in ds.shuffle(seed=seed, buffer_size=buffer):
        if source.pile_set and (record.get("meta") or {}).get("pile_set_name") != source.pile_set:
            continue
        yield record


def texts_of(source: Source, seed: int) -> Iterator[str]:
    for record in stream(source, seed):
        yield record.get(source.field) or ""


def parse_override(text: str) -> tuple[str, Source]:
    """NAME=DATASET[:CONFIG[:SPLIT[:FIELD]]] -> (name, Source)."""
    name, _, spec = text.partition("=")
    parts = spec.split(":")
    if not name or not parts[0]:
        raise SystemExit(f"--source {text!r}: expected NAME=DATASET[:CONFIG[:SPLIT[:FIELD]]]")
    dataset, config, split, field = (parts + [""] * 4)[:4]
    return name, Source(dataset, config or None, split or "train", field or "text")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows-per-corpus", type=int, default=20_000)
    parser.add_argument("--max-chars", type=int, default=4000,
                        help="longest row in characters (~1000 OPT tokens)")
    parser.add_argument("--test-rows", type=int, default=2000, help="most rows per test set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="corpora to (re)write; default all")
    parser.add_argument("--source", action="append", default=[],
                        help="NAME=DATASET[:CONFIG[:SPLIT[:FIELD]]] replaces a corpus's source")
    parser.add_argument("--with-model", action="store_true",
                        help=f"also save {TOKENIZER}'s weights (for opt125m_continued.yaml)")
    args = parser.parse_args(argv)
    sources = dict(SOURCES)
    sources.update(parse_override(s) for s in args.source)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out / "opt-125m-tokenizer")
    if args.with_model:
        AutoModelForCausalLM.from_pretrained(TOKENIZER).save_pretrained(out / "opt-125m")

    steps: list[tuple[str, Callable[[], Iterable[dict]], int]] = []
    for name, source in sources.items():
        if args.only and name not in args.only:
            continue
        steps.append((name, lambda s=source: (
            {"text": t} for t in pack(texts_of(s, args.seed), args.max_chars)),
            args.rows_per_corpus))
    if not args.only:
        steps += [
            ("toxigen", lambda: toxigen_rows(stream(TOXIGEN, args.seed)), args.test_rows),
            ("winobias", lambda: winobias_rows(
                r for s in WINOBIAS for r in stream(s, args.seed)), args.test_rows),
            ("truthfulqa", lambda: truthfulqa_rows(stream(TRUTHFULQA, args.seed)),
             args.test_rows),
        ]
    for name, rows, limit in steps:
        n = write_parquet(rows(), out / f"{name}.parquet", limit)
        print(f"{name}: {n} rows -> {out / f'{name}.parquet'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
