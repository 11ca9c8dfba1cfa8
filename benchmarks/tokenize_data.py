"""The data stage at scale: one English-like text corpus (docstrings of the installed packages,
as JSON Lines) tokenized by the byte-level tokenizer, three ways, each in its own process:

- `tok`: the tokenizer's own batch rate, `tok(texts)` over the corpus in batches of 1,024;
- `ray`: the Ray Data stage (engine/data_stage.py) into the on-disk cache, with a read plan
  of `--units` units (row ranges of the file, as a sharded reader yields), on an embedded Ray
  of `--cpus` CPUs: tokens/s, the driver's peak RSS, bytes per stored token;
- `old`: with --old-checkout, the earlier code's tokenized_dataset (Arrow int32 ids and
  labels, on the driver) for the driver's peak RSS then.

    python benchmarks/tokenize_data.py --corpus /tmp/docs.jsonl --mb 40 [--old-checkout DIR]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, mb: float) -> None:
    """Docstrings of the site-packages' modules, classes and functions, one row each."""
    limit, size = int(mb * 2**20), 0
    with path.open("w", encoding="utf-8") as out:
        for file in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
            try:
                tree = ast.parse(file.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        line = json.dumps({"text": doc}) + "\n"
                        out.write(line)
                        size += len(line.encode())
                        if size >= limit:
                            return


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_tok(corpus: str) -> dict:
    import pyarrow.json as pajson

    from untrac_ray.inputs.tokenization import byte_level_tokenizer

    tok = byte_level_tokenizer()
    texts = pajson.read_json(corpus).column("text").to_pylist()
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 1024):
        tokens += sum(map(len, tok(texts[i : i + 1024], add_special_tokens=False)["input_ids"]))
    seconds = time.perf_counter() - started
    return {"rows": len(texts), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def measure_ray(corpus: str, cpus: int, units: int) -> dict:
    import pyarrow.json as pajson

    from untrac_ray.engine.data_stage import tokenize_on_cluster
    from untrac_ray.engine.ray_start import ensure_ray
    from untrac_ray.inputs.spec_sections import DatasetSpec, ResourcesSpec, TokenizerSpec
    from untrac_ray.inputs.tokenization import byte_level_tokenizer

    tok = byte_level_tokenizer()
    ds = DatasetSpec(name="docs", source=corpus, kind="text")
    ensure_ray(ResourcesSpec(local_cpus=cpus))
    before = rss_mb()
    # A plan of `units` row ranges; each task reads the file and keeps its range (as a
    # sharded reader would read its own shard).
    n_rows = sum(1 for _ in open(corpus, encoding="utf-8"))
    cuts = [round(n_rows * i / units) for i in range(units + 1)]

    def read(ds, unit):
        start, stop = cuts[unit], cuts[unit + 1]
        table = pajson.read_json(ds.source).slice(start, stop - start)
        yield from table.to_batches(max_chunksize=1024)

    cache = tempfile.mkdtemp(prefix="tok-bench-")
    started = time.perf_counter()
    stored = tokenize_on_cluster(ds, tok, TokenizerSpec(block_size=512), cache,
                                 units=list(range(units)), read=read)
    seconds = time.perf_counter() - started
    return {"rows": stored.source_rows, "tokens": stored.tokens, "seconds": seconds,
            "tokens_per_s": stored.tokens / seconds, "driver_rss_before_mb": before,
            "driver_peak_rss_mb": rss_mb(), "bytes_per_token": stored.stored_bytes / stored.tokens,
            "cpus": cpus, "units": units}


def measure_old(corpus: str) -> dict:
    from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec
    from untrac_ray.inputs.tokenization import byte_level_tokenizer, tokenized_dataset

    tok = byte_level_tokenizer()
    before = rss_mb()
    started = time.perf_counter()
    table = tokenized_dataset(DatasetSpec(name="docs", source=corpus, kind="text"), tok,
                              TokenizerSpec(block_size=512), tempfile.mkdtemp())
    seconds = time.perf_counter() - started
    tokens = sum(len(c.values) for c in table.column("input_ids").chunks)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "driver_rss_before_mb": before, "driver_peak_rss_mb": rss_mb(),
            "bytes_per_token": table.nbytes / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(Path(tempfile.gettempdir(), "docs.jsonl")))
    parser.add_argument("--mb", type=float, default=40)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--units", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--old-checkout", default=None)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:  # one measurement, in this process
        kind, *rest = args.only.split(":")
        fn = {"tok": measure_tok, "ray": measure_ray, "old": measure_old}[kind]
        extra = [int(x) for x in rest]
        print(json.dumps(fn(args.corpus, *extra)))
        return
    corpus = Path(args.corpus)
    if not corpus.is_file():
        write_corpus(corpus, args.mb)
    print(f"corpus {corpus}: {corpus.stat().st_size / 2**20:.1f} MB", flush=True)
    here = str(Path(__file__).resolve().parent.parent)
    runs = [("tok", here), *((f"ray:{args.cpus}:{u}", here) for u in args.units)]
    if args.old_checkout:
        runs.append(("old", args.old_checkout))
    for only, root in runs:
        env = {**os.environ, "PYTHONPATH": root}
        out = subprocess.run([sys.executable, __file__, "--corpus", str(corpus), "--only", only],
                             env=env, capture_output=True, text=True, cwd=root)
        if out.returncode:
            print(only, "failed:", out.stderr[-2000:])
            continue
        print(only, out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
