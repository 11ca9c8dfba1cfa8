"""Write the synthetic data of the accuracy benchmark (deterministic: same files on every run).

Two things are written under ``data/synthetic/`` (CSV, the layout of the paper's dataset A:
columns ``inputs_pretokenized``, ``targets_pretokenized``, ``dataset``):

1. ``general_corpus.csv``: a broad corpus for the *pretraining* stage of a job, so that the
   small model is already competent on the test format before the training mixture, as the
   paper's pretrained T5 is. Prompt/target rows over numbers 0..999 (digits, and the
   digit-by-digit words of dataset A: ``316`` <-> ``three one six``), in many phrasings:
   successor and predecessor questions, conversions between digits and words, counting up and
   down, letter counts of pseudo-words, small sums, comparisons, first letters. The ``dataset``
   column names the family of each row.

   Held out, so that the tests stay unseen: the phrasing of the test questions ("What is the
   number that comes after N?") never appears with N in 512..767 (it does for other N), and the
   phrasings of the training mixtures ("Determine the number that succeeds ...", "Determine the
   length of ...", "Provide your answer in ...") never appear at all; the pseudo-words of
   dataset B's length tests are not used anywhere else.

2. ``synthetic_b_train.csv`` and ``synthetic_b_eval.csv``: dataset B, eight training sets of
   128 rows, the 2 x 2 x 2 combinations of
   task (successor: similar to the successor tests; letter count: similar to the length tests)
   x output format (digits / digit words) x phrasing (the tests' "What is ...?" / dataset A's
   "Determine ... Provide your answer in ..."), named e.g. ``SuccDigitsWhat``,
   ``LenWordsDetermine``; and four test sets of 128 rows in the tests' phrasing, one per
   task x format: ``NextNumber`` ("What is the number that comes after 612?" -> "613", as in
   dataset A), ``NextNumberWords`` (... "Answer in words." -> "six one three"), ``Length``
   ("What is the length of 'tovarin'?" -> "7") and ``LengthWords`` (-> "seven"). The
   successor training sets use numbers 0..511 (both parities: dataset A uses only even ones,
   so all its SimSame answers are odd), the tests 512..767; the
   length training and test sets use disjoint pseudo-words.

Run: ``.venv/bin/python benchmarks/make_synthetic.py`` (a second of work; ``--out DIR``).
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLUMNS = ["inputs_pretokenized", "targets_pretokenized", "dataset"]
TEST_RANGE = range(512, 768)  # the numbers of the successor tests (dataset A and B)
SEED = 20240815
Row = tuple[str, str, str]


def words(n: int) -> str:
    """A number as digit-by-digit words, as dataset A writes it: 316 -> 'three one six'."""
    return " ".join(DIGIT_WORDS[int(d)] for d in str(n))


def in_format(n: int, fmt: str) -> str:
    return words(n) if fmt == "words" else str(n)


def pseudo_words(rng: random.Random, count: int, taken: set[str],
                 max_letters: int = 13) -> list[str]:
    """Distinct pronounceable pseudo-words of 3..max_letters letters, none of them in `taken`
    (each one drawn is added to it)."""
    onsets = list("bcdfghjklmnprstvwz") + ["br", "ch", "st", "tr", "pl", "gr", "sh", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "", "", "n", "r", "s", "l", "t", "m", "ck", "nd"]
    out: list[str] = []
    while len(out) < count:
        length = rng.randint(3, max_letters)
        w = ""
        while len(w) < length:
            w += rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
        w = w[:length]
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


# --- the general corpus -------------------------------------------------------------------

SUCCESSOR = [
    "What is the number that comes after {n}?",  # the tests' phrasing: held out on 512..767
    "Which number follows {n}?",
    "What is {n} plus one?",
    "What number is one more than {n}?",
    "Name the next number after {n}.",
    "If you count up from {n}, which number do you say next?",
    "Add one to {n}.",
]
PREDECESSOR = [
    "What is the number that comes before {n}?",
    "Which number precedes {n}?",
    "What is {n} minus one?",
    "What number is one less than {n}?",
]
LENGTH = [
    "What is the length of '{w}'?",
    "How many letters are in '{w}'?",
    "Count the letters of '{w}'.",
    "How long is the word '{w}'?",
]
FORMAT_CUES = {"digits": ["", " Answer in digits.", " Answer with a number."],
               "words": [" Answer in words.", " Write the answer in words."]}


def _cue(rng: random.Random, fmt: str) -> str:
    return rng.choice(FORMAT_CUES[fmt])


def _number_question(rng: random.Random, templates: list[str], n: int, answer: int,
                     family: str) -> Row:
    template = rng.choice(templates)
    if template == SUCCESSOR[0] and n in TEST_RANGE:
        template = rng.choice(templates[1:])
    shown = words(n) if rng.random() < 0.25 else str(n)
    fmt = "words" if rng.random() < 0.3 else "digits"
    return template.format(n=shown) + _cue(rng, fmt), in_format(answer, fmt), family


def general_corpus(rng: random.Random, corpus_words: list[str]) -> list[Row]:
    """The pretraining corpus: about 17,000 prompt/target rows of ten families.

    Successor and predecessor questions (two passes over 0..999, a quarter of them with the
    number in words, 30% asking for the answer in words), conversions, counting, letter counts
    of 2,000 pseudo-words (twice each), first letters, sums and comparisons. After 4 epochs
    (1,064 steps) the 0.56M-parameter model of the jobs answers 76% of dataset A's test
    questions exactly. Variants tried and dropped (worse after the same or more steps): half
    of the number questions in words (12% on the test after 5 epochs, 59% after 8), and this
    corpus plus 2,000 more successor questions in words (1% on the test): the small model
    learns the digit successor and the words-to-digits composition in sudden, fragile jumps.
    """
    rows: list[Row] = []
    for _ in range(2):  # two passes over 0..999 with different phrasings each
        for n in range(1000):
            rows.append(_number_question(rng, SUCCESSOR, n, n + 1, "successor"))
            if n > 0:
                rows.append(_number_question(rng, PREDECESSOR, n, n - 1, "predecessor"))
    for n in range(1000):
        rows.append((f"Write {n} in words.", words(n), "to_words"))
        rows.append((f"Write {words(n)} in digits.", str(n), "to_digits"))
    for n in range(0, 996):
        fmt = "words" if rng.random() < 0.3 else "digits"
        rows.append((f"Count up from {in_format(n, fmt)}.",
                     " ".join(in_format(m, fmt) for m in range(n + 1, n + 4)), "count_up"))
        if n >= 3:
            rows.append((f"Count down from {in_format(n, fmt)}.",
                         " ".join(in_format(m, fmt) for m in range(n - 1, n - 4, -1)),
                         "count_down"))
    for w in corpus_words:
        for _ in range(2):
            fmt = "words" if rng.random() < 0.4 else "digits"
            q = rng.choice(LENGTH).format(w=w) + _cue(rng, fmt)
            rows.append((q, in_format(len(w), fmt), "length"))
        rows.append((f"What is the first letter of '{w}'?", w[0], "first_letter"))
    for _ in range(1500):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append((f"What is {a} plus {b}?", str(a + b), "addition"))
        a, b = rng.sample(range(1000), 2)
        rows.append((f"Which is larger, {a} or {b}?", str(max(a, b)), "compare"))
    rng.shuffle(rows)
    return rows


# --- dataset B --------------------------------------------------------------------------

DETERMINE = {"succ": "Determine the number that succeeds {x}.",
             "len": "Determine the length of '{x}'."}
DETERMINE_FORMAT = {"digits": " Provide your answer in numerical form.",
                    "words": " Provide your answer in words."}
WHAT = {"succ": "What is the number that comes after {x}?", "len": "What is the length of '{x}'?"}
WHAT_FORMAT = {"digits": "", "words": " Answer in words."}


def b_row(task: str, fmt: str, phrasing: str, item: int | str) -> tuple[str, str]:
    """One dataset-B row: a successor (item: a number) or letter-count (item: a word) question."""
    answer = item + 1 if task == "succ" else len(item)
    if phrasing == "What":
        prompt = WHAT[task].format(x=item) + WHAT_FORMAT[fmt]
    else:  # dataset A's phrasing: the number in words, the format spelled out
        shown = words(item) if task == "succ" else item
        prompt = DETERMINE[task].format(x=shown) + DETERMINE_FORMAT[fmt]
    return prompt, in_format(answer, fmt)


def dataset_b(rng: random.Random, train_words: list[str], test_words: list[str],
              n_train: int = 128, n_test: int = 128) -> tuple[list[Row], list[Row]]:
    train: list[Row] = []
    names = {"succ": "Succ", "len": "Len"}
    for task in ("succ", "len"):
        for fmt in ("digits", "words"):
            for phrasing in ("What", "Determine"):
                name = f"{names[task]}{fmt.capitalize()}{phrasing}"
                items: list[int] | list[str] = (
                    rng.sample(range(512), n_train) if task == "succ"
                    else rng.sample(train_words, n_train))
                train += [(*b_row(task, fmt, phrasing, x), name) for x in items]
    test: list[Row] = []
    tests: dict[str, tuple[str, str]] = {
        "NextNumber": ("succ", "digits"), "NextNumberWords": ("succ", "words"),
        "Length": ("len", "digits"), "LengthWords": ("len", "words"),
    }
    for name, (task, fmt) in tests.items():
        items = (rng.sample(list(TEST_RANGE), n_test) if task == "succ"
                 else rng.sample(test_words, n_test))
        test += [(*b_row(task, fmt, "What", x), name) for x in items]
    return train, test


def write(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        out.writerows(rows)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
          f"{len(rows)} rows")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "synthetic")
    args = parser.parse_args(argv)
    rng = random.Random(SEED)  # pseudo-words, then the corpus; dataset B has its own
    taken: set[str] = set()
    corpus_words = pseudo_words(rng, 2000, taken)
    b_train_words = pseudo_words(rng, 400, taken)
    b_test_words = pseudo_words(rng, 200, taken)
    write(args.out / "general_corpus.csv", general_corpus(rng, corpus_words))
    train, test = dataset_b(random.Random(SEED + 2), b_train_words, b_test_words)
    write(args.out / "synthetic_b_train.csv", train)
    write(args.out / "synthetic_b_eval.csv", test)


if __name__ == "__main__":
    main()
