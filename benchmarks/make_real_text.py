"""Write the data of the real-text benchmark (deterministic: the same bytes on every run on one
machine; the versions it read are recorded in ``versions.json``).

The text benchmarks (benchmarks/make_text_corpora.py) are made from templates; this one is
real English: which training corpus made a model produce a piece of library documentation?
The texts are the prose of the documentation of the Python libraries installed in this
project's venv (read from the source with ``ast`` and from the distributions' METADATA, nothing
is imported), one corpus per field of programming, after a general stage on the standard
library's prose. Everything is written under ``data/real_text/`` (CSV columns ``text``,
``dataset``, ``origin``: where a text comes from, ``path:qualified name`` or
``dist:Name:Summary|Description``):

1. Cleaning: every module, public class and function docstring and every METADATA summary and
   description is split into paragraphs; doctests, code blocks (after ``::``, fenced or
   indented), parameter tables and the sections Parameters / Returns / Raises / See Also /
   Examples / ... (numpydoc, Google, markdown), directives, headings, tables and lists of
   several items are dropped, inline markup (roles, backquotes, links, emphasis) becomes plain
   words. A paragraph is kept when it is ASCII English prose: a capital first, a full stop
   last, 8+ words, 95% letters and punctuation, no URL, maths or licence text, 60+ characters;
   it is cut to at most 300 (after its last whole sentence that fits). Texts are deduplicated
   across all fields, also texts that differ only in capitalised words and numbers
   (transformers' per-model copies). Per field, in the order of ``FIELDS`` (pool sizes at
   the package versions of ``versions.json``): Numerics (numpy, scipy, pandas, sympy, mpmath,
   networkx: 14,947 texts), Web (requests, urllib3, aiohttp, starlette, fastapi, werkzeug,
   flask, uvicorn, h11, httpcore2, httpx2, gunicorn, yarl, multidict, wsproto,
   websocket-client: 1,836), MachineLearning (torch, transformers, sklearn, accelerate, optuna,
   kronfluence, safetensors, tokenizers: 13,214), Terminal (click, typer, rich, pygments,
   tqdm, prettytable, colorlog, wcwidth, shellingham: 1,096), Formats (pyarrow, PyYAML,
   protobuf, msgpack, tomlkit, jsonschema, referencing: 373), Testing (pytest, pluggy,
   iniconfig: 730), Databases (SQLAlchemy, alembic, sqlparse, stdlib sqlite3 / dbm / shelve:
   4,057). Each pool is sorted (package, path, name) and shuffled with a fixed seed.

2. ``general_corpus.csv``: 3,545 texts (503k characters, 129,580 tokens: 1,012 blocks of 128):
   the language reference (``pydoc_data/topics.py``), the licence, the Zen (``this.py``,
   decoded) and the docstrings of stdlib modules of no field (``GENERAL_STDLIB``: collections,
   typing, logging, pathlib, threading, tkinter, idlelib, distutils ...; no web, tests,
   numbers, data formats, command lines, databases, mail or compression).

3. ``corpora.csv``: six training corpora of unequal size (7.5x), the first rows of each
   shuffled pool: Numerics 300 texts (92 blocks), Web 200 (56), MachineLearning 140 (46),
   Terminal 90 (24), Formats 60 (15), Testing 40 (9); 830 texts, 110k characters, 132 a text.

4. ``tests.csv``: 40 held-out texts (the pools' first rows, in no corpus) of Numerics (12
   blocks), Terminal (11) and Testing (8), taught by a large, a middling and the smallest
   corpus, and of Databases (12), which no corpus teaches (nor the general corpus).

5. ``tokenizer/``: a byte-level BPE (GPT-2's ByteLevel pre-tokenizer and decoder, 3,000 ids
   with ``<|endoftext|>`` as bos/eos/pad/unk) trained on the general corpus and the corpora in
   file order (one thread; trained twice and compared), saved with ``save_pretrained`` for
   ``tokenizer: {kind: pretrained, path: ...}``: 3.4-3.9 characters a token.
   ``versions.json``: Python, tokenizers, transformers and every distribution read.

jobs/real_text.yaml, seed 0 (2 CPU cores): pretraining 192 steps in 158 s (loss 5.55 nats a
token), the mixture 48 steps in 32 s (5.64), the whole job 8.2 minutes (tasks 4.9: LDO 239
actor-seconds, UnTrac-Inv 156, EK-FAC 97, gradients 37, UnTrac 15). LDO (mean of 3 seeds; SNR
5.3, SNRm 9.2) puts each held-out field's own corpus clearly first: HeldOutNumerics Numerics
+0.189 (next MachineLearning +0.018), HeldOutTerminal Terminal +0.096 (Web +0.023),
HeldOutTesting Testing +0.032 (Web +0.010); Databases is flat (+0.004 .. +0.031, every corpus
a little: the shared docstring register). Pearson with LDO (mean over the 4 test sets):
EK-FAC +0.67, GradCos +0.66, TracIn +0.60, GradDot +0.57, UnTrac-Inv +0.53, UnTrac +0.03
(its last point: one epoch of ascent over Numerics raises every test's loss).

Run: ``.venv/bin/python benchmarks/make_real_text.py`` (``--out DIR``).
"""

from __future__ import annotations

import argparse
import ast
import codecs
import csv
import json
import os
import random
import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' trainer: one thread, light CPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(sysconfig.get_paths()["purelib"])
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEED = 20240917
MIN_CHARS, MAX_CHARS = 60, 300
TEST_ROWS = 40
VOCAB_SIZE = 3000
EOS = "<|endoftext|>"
COLUMNS = ["text", "dataset", "origin"]

# Fields: folders under site-packages (a distribution's importable package); the Databases
# field also takes stdlib modules. Every field but Databases is a training corpus.
FIELDS: dict[str, tuple[str, ...]] = {
    "Numerics": ("numpy", "scipy", "pandas", "sympy", "mpmath", "networkx"),
    "Web": ("requests", "urllib3", "aiohttp", "starlette", "fastapi", "werkzeug", "flask",
            "uvicorn", "h11", "httpcore2", "httpx2", "gunicorn", "yarl", "multidict", "wsproto",
            "websocket"),
    "MachineLearning": ("torch", "transformers", "sklearn", "accelerate", "optuna",
                        "kronfluence", "safetensors", "tokenizers"),
    "Terminal": ("click", "typer", "rich", "pygments", "tqdm", "prettytable", "colorlog",
                 "wcwidth", "shellingham"),
    "Formats": ("pyarrow", "yaml", "google/protobuf", "msgpack", "tomlkit", "jsonschema",
                "referencing"),
    "Testing": ("pytest", "_pytest", "pluggy", "iniconfig"),
    "Databases": ("sqlalchemy", "alembic", "sqlparse"),
}
FIELD_STDLIB = {"Databases": ("sqlite3", "dbm", "shelve")}
DIST_OF = {"google/protobuf": "protobuf"}  # where the top-level folder holds several dists
# Training corpora (max rows; unequal, 7.5x between the largest and the smallest) and the
# fields with a held-out test set; Databases is the test set that no corpus teaches.
CORPUS_ROWS = {"Numerics": 300, "Web": 200, "MachineLearning": 140, "Terminal": 90,
               "Formats": 60, "Testing": 40}
TESTED = ("Numerics", "Terminal", "Testing", "Databases")
# The general corpus: the language reference (pydoc_data), the licence, the Zen, and the
# docstrings of stdlib modules of none of the fields (no web, testing, numbers, data formats,
# command lines, databases, mail or compression).
GENERAL_STDLIB = (
    "abc.py", "ast.py", "bdb.py", "calendar.py", "code.py", "codeop.py", "collections",
    "concurrent", "contextlib.py", "contextvars.py", "copy.py", "dataclasses.py", "datetime.py",
    "difflib.py", "dis.py", "enum.py", "filecmp.py", "fileinput.py", "fnmatch.py",
    "functools.py", "gettext.py", "glob.py", "graphlib.py", "heapq.py", "bisect.py",
    "importlib", "inspect.py", "linecache.py", "locale.py", "logging", "multiprocessing",
    "operator.py", "os.py", "pathlib.py", "pdb.py", "pkgutil.py", "platform.py", "pprint.py",
    "profile.py", "pstats.py", "pyclbr.py", "pydoc.py", "queue.py", "reprlib.py", "runpy.py",
    "sched.py", "selectors.py", "shlex.py", "shutil.py", "signal.py", "site.py", "string.py",
    "subprocess.py", "symtable.py", "tempfile.py", "textwrap.py", "threading.py",
    "tkinter", "tokenize.py", "trace.py", "traceback.py", "tracemalloc.py", "turtle.py",
    "types.py", "typing.py", "warnings.py", "weakref.py", "zoneinfo", "idlelib", "lib2to3",
    "distutils", "codecs.py", "_pyio.py", "io.py", "timeit.py", "rlcompleter.py", "turtledemo",
    "zipimport.py", "_collections_abc.py", "posixpath.py", "genericpath.py", "chunk.py",
    "sunau.py", "aifc.py", "sndhdr.py", "encodings", "ctypes", "venv", "uuid.py", "sysconfig.py",
    "py_compile.py", "tabnanny.py", "_threading_local.py",
)
SKIP_DIRS = {"tests", "test", "testing", "_vendor", "vendor", "externals", "examples",
             "benchmarks", "__pycache__", "_distutils"}
DROP_SECTIONS = {"parameters", "params", "args", "arguments", "keyword arguments", "kwargs",
                 "returns", "return", "yields", "yield", "raises", "raise", "see also",
                 "examples", "example", "references", "attributes", "methods", "warns",
                 "other parameters", "usage", "installation", "contents", "table of contents"}
BAD_WORDS = re.compile(r"copyright|licen[cs]e|spdx|copied from|todo|xxx|http|www\.|\.com\b|"
                       r"\bnoqa\b|autogenerated|auto-generated|:math:|\\", re.IGNORECASE)


# --- cleaning ---------------------------------------------------------------------------------

ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                       "\u2013": "-", "\u2014": "-", "\u2026": "...", "\u00a0": " "})


def clean_inline(text: str) -> str:
    """reST / markdown inline markup to plain words, typographic quotes and dashes to ASCII."""
    text = text.translate(ASCII)
    text = re.sub(r":[\w:.+-]+:`~?(?:[^`<]*<)?([^`>]*)>?`", lambda m: m[1].split(".")[-1]
                  if m[1].startswith(("~", ".")) else m[1], text)
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)  # `text <url>`_
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](url), images
    text = re.sub(r"\[\d+\]_|\[#\w*\]_|^\[\d+\] ", "", text)  # footnotes
    text = re.sub(r"`{1,2}([^`]+)`{1,2}_?", r"\1", text)
    text = re.sub(r"\*{1,2}([^*\s][^*]*)\*{1,2}", r"\1", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ([,.;:])", r"\1", text)
    return text[:-1] + "." if text.endswith(":") else text  # "... as follows:" ends a sentence


def truncate(text: str) -> str:
    """At most MAX_CHARS characters, cut after the last sentence that fits (else a word)."""
    if len(text) <= MAX_CHARS:
        return text
    cut = text[: MAX_CHARS + 1]
    ends = [m.end() for m in re.finditer(r"[.!?](?= )", cut)]
    ends = [e for e in ends if e >= MIN_CHARS]
    return cut[: ends[-1]] if ends else cut[: cut.rfind(" ")].rstrip(",;:")


def is_prose(text: str, bad: re.Pattern = BAD_WORDS) -> bool:
    """An English sentence or more: letters and spaces, a capital first, a full stop last."""
    if len(text) < MIN_CHARS or not text.isascii() or bad.search(text):
        return False
    if not (text[0].isupper() and text[-1] in ".!?") or len(text.split()) < 8:
        return False
    plain = sum(c.isalpha() or c in " ,.;:'\"()-?!" for c in text)
    return plain >= 0.95 * len(text) and sum("_" in w for w in text.split()) <= 3


def paragraphs(doc: str, bad: re.Pattern = BAD_WORDS) -> list[str]:
    """The prose paragraphs of a docstring or a README: no doctests, code blocks, parameter
    tables (numpydoc / Google sections), directives, lists, headings or tables."""
    out: list[str] = []
    skip = code = False
    for block in re.split(r"\n\s*\n", doc.expandtabs()):
        lines = [ln.rstrip() for ln in block.strip("\n").splitlines() if ln.strip()]
        if not lines:
            continue
        head = lines[0].strip().rstrip(":").lower()
        if len(lines) >= 2 and re.fullmatch(r"[-=~^*#]{3,}", lines[1].strip()):
            skip, lines = head in DROP_SECTIONS, lines[2:]  # a numpydoc/reST section
        elif re.fullmatch(r"#+ .*", lines[0].strip()):
            skip, lines = head.lstrip("# ") in DROP_SECTIONS, lines[1:]  # a markdown heading
        elif re.fullmatch(r"[A-Z][\w ]*:", lines[0].strip()):
            skip, lines = head in DROP_SECTIONS, lines[1:]  # a Google-style section
        if skip or not lines:
            continue
        indented = lines[0].startswith(" ")
        if code and indented:
            continue
        code = False
        if bullet := re.match(r"(?:[-*+]|\d+[.)]) ", lines[0]):  # one list item: its text
            pad = " " * bullet.end()
            if all(ln.startswith(pad) and ln[len(pad)] != " " for ln in lines[1:]):
                lines = [lines[0][bullet.end():]] + [ln[len(pad):] for ln in lines[1:]]
        if indented or any(ln.startswith(" ") for ln in lines):
            continue  # a code block, a definition list, a parameter table
        if lines[0].startswith((">>>", "...", ".. ", "```", "|", "+-", "==", "<", "- ", "* ")):
            continue
        text = " ".join(ln.strip() for ln in lines)
        if text.endswith("::"):
            code, text = True, text[:-1]
        text = clean_inline(text)
        if is_prose(text, bad):
            out.append(truncate(text))
    return out


# --- collecting -------------------------------------------------------------------------------

def python_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def docstrings(path: Path) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a source file's module, public classes and functions,
    read with ast (nothing is imported)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name.startswith("_") and not child.name.endswith("__"):
                    continue
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    found.append((name, doc))
                visit(child, name + ".")

    if doc := ast.get_docstring(tree):
        found.append(("<module>", doc))
    visit(tree, "")
    return found


def source_texts(base: Path, entries: tuple[str, ...], label: str) -> list[tuple[str, str]]:
    """(text, origin) of every prose paragraph of the entries' docstrings, in sorted order."""
    rows = []
    for entry in entries:
        for file in python_files(base / entry):
            rel = file.relative_to(base).as_posix()
            for name, doc in docstrings(file):
                rows += [(t, f"{label}{rel}:{name}") for t in paragraphs(doc)]
    return rows


def description_texts(entries: tuple[str, ...], versions: dict[str, str]):
    """(text, origin) of the distributions' METADATA summaries and descriptions."""
    owners = metadata.packages_distributions()
    rows = []
    for entry in entries:
        name = DIST_OF.get(entry) or sorted(owners[entry.split("/")[0]])[0]
        dist = metadata.distribution(name)
        versions[dist.metadata["Name"]] = dist.version
        meta = dist.metadata
        body = meta.get("Description") or meta.get_payload() or ""
        for part, text in (("Summary", meta.get("Summary") or ""), ("Description", body)):
            rows += [(t, f"dist:{dist.metadata['Name']}:{part}") for t in paragraphs(text)]
    return rows


def general_texts() -> list[tuple[str, str]]:
    """The language reference (pydoc_data's topics, read with ast), the licence, the Zen and
    the docstrings of unrelated stdlib modules."""
    tree = ast.parse((STDLIB / "pydoc_data" / "topics.py").read_bytes())
    topics = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign))
    rows = [(t, f"stdlib:pydoc_data/topics.py:{k}") for k in sorted(topics)
            for t in paragraphs(topics[k])]
    licence = paragraphs((STDLIB / "LICENSE.txt").read_text(), re.compile(r"http|www\."))
    rows += [(t, "stdlib:LICENSE.txt") for t in licence]
    tree = ast.parse((STDLIB / "this.py").read_bytes())
    zen, chunk = codecs.decode(ast.literal_eval(tree.body[0].value), "rot13"), ""
    for line in zen.splitlines()[2:]:  # its aphorisms, a few to a text
        if len(chunk) + len(line) >= MAX_CHARS:
            rows.append((chunk, "stdlib:this.py"))
            chunk = ""
        chunk = f"{chunk} {line}".strip()
    rows.append((chunk, "stdlib:this.py"))
    return rows + source_texts(STDLIB, GENERAL_STDLIB, "stdlib:")


def collect(versions: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Every field's texts and the general corpus's, deduplicated across all of them (also
    near-duplicates that differ only in names and numbers: transformers' per-model copies)."""
    seen: set[str] = set()
    out: dict[str, list[tuple[str, str]]] = {}
    sources = {f: source_texts(SITE, e, "") + description_texts(e, versions)
               + source_texts(STDLIB, FIELD_STDLIB.get(f, ()), "stdlib:")
               for f, e in FIELDS.items()}
    sources["General"] = general_texts()
    for field, rows in sources.items():
        kept = []
        for text, origin in rows:
            key = re.sub(r"\W+", " ", re.sub(r"\w*[A-Z0-9]\w*", "#", text)).lower()
            if key not in seen:
                seen.add(key)
                kept.append((text, origin))
        out[field] = kept
    return out


# --- corpora, test sets, tokenizer ------------------------------------------------------------

def split(texts: dict[str, list[tuple[str, str]]]):
    """Shuffle each field (fixed seeds) and cut it: the first TEST_ROWS rows of a tested field
    are its test set, the next CORPUS_ROWS[field] its training corpus."""
    corpora, tests = [], []
    for i, (field, rows) in enumerate(texts.items()):
        if field == "General":
            continue
        rows = list(rows)
        random.Random(SEED + i).shuffle(rows)
        if field in TESTED:
            tests += [(t, field, o) for t, o in rows[:TEST_ROWS]]
            rows = rows[TEST_ROWS:]
        corpora += [(t, field, o) for t, o in rows[: CORPUS_ROWS.get(field, 0)]]
    general = list(texts["General"])
    random.Random(SEED - 1).shuffle(general)
    return [(t, "General", o) for t, o in general], corpora, tests


def train_tokenizer(texts: list[str]):
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on the given texts in their order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, unk_token=EOS)
    fast.save_pretrained(folder)
    print(f"wrote {shown(folder)}/: {len(fast)} tokens, "
          + ", ".join(sorted(p.name for p in folder.iterdir())))


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def write(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(COLUMNS)
        out.writerows(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[1]] = counts.get(r[1], 0) + 1
    print(f"wrote {shown(path)}: {len(rows)} rows, {sum(len(r[0]) for r in rows):,} characters "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "real_text")
    args = parser.parse_args(argv)
    versions: dict[str, str] = {}
    general, corpora, tests = split(collect(versions))
    write(args.out / "general_corpus.csv", general)
    write(args.out / "corpora.csv", corpora)
    write(args.out / "tests.csv", tests)
    texts = [r[0] for r in general + corpora]
    tok = train_tokenizer(texts)
    if tok.to_str() != train_tokenizer(texts).to_str():
        sys.exit("the tokenizer's training is not deterministic here")
    save_tokenizer(tok, args.out / "tokenizer")
    import tokenizers
    import transformers

    record = {"python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
              "transformers": transformers.__version__,
              "distributions": dict(sorted(versions.items()))}
    (args.out / "versions.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {shown(args.out / 'versions.json')}")


if __name__ == "__main__":
    main()
