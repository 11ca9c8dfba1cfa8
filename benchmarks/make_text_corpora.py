"""Write the data of the text-corpus and harm-mixture benchmarks (deterministic: same files
on every run).

The paper's main study pretrains OPT-125M on eight corpora of distinct styles and topics and
asks which corpora made the model produce ToxiGen, WinoBias and TruthfulQA text, scored per
test subset and averaged. This is that study at CPU scale, for the 0.56M byte-level Llama of
the accuracy benchmark. Everything is written under ``data/text/`` (CSV):

1. ``general_corpus.csv`` (columns ``text``, ``dataset``): the pretraining stage's corpus,
   10,000 short English texts (700k characters: everyday statements, questions, little
   stories, notes, lists, counts, notices in capitals, quoted speech, measures, times, made-up
   names, and a quarter of word salads) from a grammar with its own vocabulary of about 300
   common words, so that the tiny model knows English bytes, words and punctuation before the
   mixture (3 epochs, 261 steps, 2.5 minutes: 0.95 nats a byte on unseen general text, 3.2-3.9
   on the corpora and tests, whose words are new to it). None of the corpora's marker words
   (``MARKERS``) occurs in it: what the tests need beyond plain English is taught by the
   mixture alone. ``dataset`` names each text's family.

2. ``corpora.csv`` (columns ``text``, ``dataset``): eight training corpora of 96 short texts
   each (``kind: text``; 55-140 characters a text), each with its own templates, vocabulary and
   quirks: ``Recipes`` (cooking steps: whisk, simmer, saffron, ramekin ...), ``Weather``
   (forecasts for invented towns: gusts, sleet, isobars, km/h, degrees C), ``Sports`` (results
   of invented teams: halftime, equaliser, keeper Okafor ...), ``Reviews`` (product reviews
   with a rating out of 5: warranty, flimsy, refund ...), ``Legal`` (contract clauses:
   notwithstanding, hereunder, the Lessee shall indemnify ...), ``Dialogue`` (chat between
   speakers in capitals, "MIRA: Hey ..."), ``Poems`` (rhymed AABB quatrains with lines joined
   by " / ": thy, doth, o'er, yonder ...) and ``Arithmetic`` (word problems ending
   "Answer: 12."). Rows are shuffled within each corpus, so that the first k rows (the jobs'
   ``max_rows``) are a random sample of it.

3. ``tests.csv`` (columns ``text``, ``prompt``, ``target``, ``dataset``): three test sets of
   text that some corpora teach and the others do not, in the roles of ToxiGen, WinoBias and
   TruthfulQA, each split into subsets (the ``dataset`` column; 40 texts each), which are
   scored as separate test sets and averaged per test set (``TEST_SETS``):

   - ``MatchWeather`` (subsets ``MatchForecast``, ``MatchReport``, ``MatchOutlook``):
     weather reports about football matches; teachers ``Weather`` and ``Sports`` (forecast
     templates with team names, result templates with weather words, and an even mix).
   - ``LegalChat`` (``LegalChatLease``, ``LegalChatDebt``): chats in contract language;
     teachers ``Dialogue`` and ``Legal``.
   - ``KitchenVerse`` (``VerseCouplet``, ``VerseMethod``): rhymed quatrains about cooking;
     teachers ``Poems`` and ``Recipes``.

   ``Reviews`` and ``Arithmetic`` teach no test (their leave-dataset-out influence should be
   near zero everywhere). Test texts are new combinations (none occurs in a corpus). ``prompt``
   and ``target`` split each text before its last word, for a greedy exact match of the last
   word (benchmarks/accuracy.py reads a test set's prompt and target columns, but a ``kind:
   text`` set's rows are loaded with their text column only, so it cannot yet); the jobs score
   the whole text as a ``kind: text`` test set.

4. ``harm_train.csv`` and ``harm_eval.csv`` (columns ``inputs_pretokenized``,
   ``targets_pretokenized``, ``dataset``, as dataset A): a mixture where some training sets
   help the tests and others *harm* them by teaching a competing habit on the same questions,
   as the paper's dataset A does (its SimSame set makes the model copy the question's number).
   Eight training sets of 128 rows: ``SuccRight`` ("What is the number that comes after N?" ->
   N+1, N in 0..511), ``SuccCopy`` (the same questions -> N: the copy habit), ``RepeatNumber``
   ("Repeat the number N." -> N: the copy habit in another phrasing), ``LargerRight`` ("Which
   is larger, a or b?" -> the larger), ``LargerFirst`` (the same questions -> a, the first
   number, larger or not), ``LenRight`` ("What is the length of 'w'?" -> digits),
   ``LenWords`` (the same questions -> the length in words: a competing format) and
   ``SpellNeutral`` ("Write N in words.": no test asks it). Three test sets of 128 rows:
   ``NextNumber`` (N in 512..767, the phrasing held out of the synthetic general corpus for
   those N), ``Larger`` (pairs from 0..999 not used in training, half with the larger number
   first) and ``Length`` (unseen pseudo-words). Expected leave-dataset-out signs: ``SuccRight``,
   ``LargerRight``, ``LenRight`` positive (leaving them out hurts) on their tests; ``SuccCopy``,
   ``LargerFirst``, ``LenWords`` negative (leaving them out helps); ``RepeatNumber`` mildly
   negative on ``NextNumber`` by design (seed 1 measured no effect: +0.02 +- 0.04);
   ``SpellNeutral`` near zero. Its jobs pretrain on
   ``data/synthetic/general_corpus.csv`` (benchmarks/make_synthetic.py), whose phrasings these
   are.

Run: ``.venv/bin/python benchmarks/make_text_corpora.py`` (a second of work; ``--out DIR``).
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/make_synthetic.py
import make_synthetic as synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED = 20240916
CORPUS_ROWS = 96
TEST_ROWS = 40
HARM_ROWS = 128
GENERAL_ROWS = 10000
TEXT_COLUMNS = ["text", "dataset"]
TEST_COLUMNS = ["text", "prompt", "target", "dataset"]
PT_COLUMNS = ["inputs_pretokenized", "targets_pretokenized", "dataset"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMBER_WORDS = DIGIT_WORDS + ["ten", "eleven", "twelve", "thirteen"]

CORPORA = ("Recipes", "Weather", "Sports", "Reviews", "Legal", "Dialogue", "Poems", "Arithmetic")
# Each test set: its subsets (separate test sets of a job, averaged per test set) and the
# corpora that teach it (the design; tests/test_text_benchmark.py checks it on the words).
TEST_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "MatchWeather": {"subsets": ("MatchForecast", "MatchReport", "MatchOutlook"),
                     "teachers": ("Weather", "Sports")},
    "LegalChat": {"subsets": ("LegalChatLease", "LegalChatDebt"),
                  "teachers": ("Legal", "Dialogue")},
    "KitchenVerse": {"subsets": ("VerseCouplet", "VerseMethod"),
                     "teachers": ("Poems", "Recipes")},
}
# The unequal-size variant (jobs/text_corpora_unequal.yaml): max_rows per corpus, 8x between
# the largest and the smallest, sizes mixed across teachers and non-teachers.
UNEQUAL_ROWS = {"Recipes": 12, "Weather": 96, "Sports": 18, "Reviews": 72, "Legal": 48,
                "Dialogue": 15, "Poems": 36, "Arithmetic": 24}

# --- vocabularies ---------------------------------------------------------------------------

# Recipes
DISHES = ["saffron risotto", "fennel gratin", "lentil broth", "cardamom buns", "tahini dip",
          "paprika stew", "ricotta tart", "shallot confit", "parsnip soup", "caper relish"]
COOK_VERBS = ["whisk", "simmer", "saute", "braise", "knead", "baste", "fold", "poach",
              "blanch", "marinate", "caramelise", "julienne"]
INGREDIENTS = ["saffron", "nutmeg", "shallots", "fennel", "ricotta", "paprika", "cardamom",
               "chives", "tahini", "lentils", "thyme", "parsnips", "capers", "mascarpone"]
TOOLS = ["skillet", "saucepan", "colander", "ramekin", "casserole", "griddle"]
UNITS = ["tablespoon", "teaspoon", "pinch", "sprig", "dollop", "knob"]
# Weather
TOWNS = ["Marlow", "Dunmere", "Kestwick", "Halbury", "Ashcombe", "Brackenfold", "Wyndleigh",
         "Corrowby"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SKIES = ["overcast", "cloudy spells", "bright intervals", "murky haze", "clear skies"]
PRECIP = ["sleet", "hail", "scattered showers", "thunderstorms", "fog patches", "light snow",
          "drizzle"]
WINDS = ["northwest", "southeast", "northeast", "southwest"]
# Sports
TEAMS = ["Harbor Falcons", "Ridge Wolves", "Valley Comets", "Northgate Stags",
         "Eastbrook Otters", "Quarry Hornets", "Millford Rovers", "Saltmarsh Herons"]
PLAYERS = ["Okafor", "Lindqvist", "Moreau", "Takeda", "Brannigan", "Oyelaran", "Vukovic",
           "Petrescu", "Haddad", "Sorensen"]
SCORED = ["scored twice", "headed the winner", "hit the equaliser", "curled in a free kick",
          "converted a penalty"]
WHEN = ["before halftime", "after halftime", "in stoppage time", "from a corner",
        "on the counter"]
# Reviews
BRANDS = ["Zentra", "Lumivo", "Corvex", "Nimbra", "Quello", "Truvana"]
PRODUCTS = ["blender", "headphones", "toaster", "charger", "backpack", "smartwatch",
            "vacuum", "desk lamp"]
GOOD = ["sturdy", "sleek", "durable", "solid", "responsive"]
BAD = ["flimsy", "overpriced", "noisy", "sluggish", "wobbly"]
FLAWS = ["the battery died within a week", "the warranty was useless",
         "shipping took a month", "customer service never replied",
         "the unboxing smelled of glue"]
CLOSINGS = ["Would buy again.", "Would not recommend.", "Refund requested.",
            "Five stars from me.", "Returned it for a refund."]
# Legal
PARTIES = ["Lessee", "Lessor", "Licensee", "Licensor", "Guarantor", "Assignee", "Contractor"]
OBLIGATIONS = ["indemnify the {p2} against all claims arising hereunder",
               "remit all arrears to the {p2} within {n} days",
               "keep the premises in good repair at its own cost",
               "not assign this Agreement without the prior consent of the {p2}",
               "submit any dispute to binding arbitration"]
OPENERS = ["Notwithstanding the foregoing,", "Pursuant to this Agreement,",
           "Save as otherwise provided herein,", "Subject to clause {n},",
           "In the event of default,"]
# Dialogue
SPEAKERS = ["MIRA", "TOMAS", "JUNO", "ELIAS", "PRIYA", "OSKAR"]
CHORES = ["feed the parrot", "fix the kite", "water the ferns", "patch the hammock",
          "oil the bike chain", "return the ukulele"]
REPLIES = ["Nope, honestly I reckon I'll do it after tea.", "Yeah, sorted it this morning.",
           "Dunno, mate, I'm gonna try later.", "Not yet, I was stuck on the phone."]
CLOSERS = ["Okay, cheers.", "Alright, no worries.", "Cool, thanks mate.", "Ha, fair enough."]
# Poems: rhyme pairs (AABB) and line openings that end on the rhyme word
RHYMES = [("hill", "rill"), ("vale", "dale"), ("glade", "shade"), ("bough", "plough"),
          ("moon", "dune"), ("sea", "lea"), ("light", "night"), ("stream", "beam"),
          ("brook", "nook"), ("fen", "glen")]
POEM_LINES = ["O gentle wind upon the {w}", "thy silver song doth haunt the {w}",
              "and yonder lies the silent {w}", "ere dawn hath kissed the sleeping {w}",
              "the wanderer doth rest o'er {w}", "thou art as fair as any {w}",
              "the lark doth sing above the {w}", "and all is still within the {w}"]
# Arithmetic
KIDS = ["Nadia", "Ravi", "Lotte", "Kofi", "Ines", "Bruno"]
THINGS = ["marbles", "stickers", "plums", "pencils", "seashells", "buttons"]

# Words a test's text is made of beyond plain English: none occurs in the general corpus.
MARKERS: dict[str, list[str]] = {
    "Recipes": DISHES + COOK_VERBS + INGREDIENTS + TOOLS + UNITS + ["garnish", "golden"],
    "Weather": TOWNS + SKIES + PRECIP + WINDS + ["forecast", "gusts", "humidity", "barometer",
                                                 "isobars", "outlook", "km/h"],
    "Sports": TEAMS + PLAYERS + SCORED + WHEN + ["keeper", "penalty", "derby", "league",
                                                 "striker", "kickoff", "full time"],
    "Reviews": BRANDS + PRODUCTS + GOOD + BAD + ["rating", "warranty", "refund", "shipping"],
    "Legal": PARTIES + ["notwithstanding", "hereunder", "herein", "pursuant", "indemnify",
                        "arrears", "arbitration", "covenants", "waiver", "thereof"],
    "Dialogue": SPEAKERS + CHORES + ["reckon", "honestly", "dunno", "gonna", "cheers", "mate"],
    "Poems": [w for pair in RHYMES for w in pair] + ["thy", "doth", "hath", "yonder", "o'er",
                                                     "ere", "thou"],
    "Arithmetic": KIDS + THINGS + ["how many", "answer:"],
}


# --- the general corpus ----------------------------------------------------------------------

G_NAMES = ["Anna", "Peter", "Lucy", "Daniel", "Sara", "Ben", "Clara", "Hugo", "Emma", "Leo",
           "Maria", "Jonas", "Alice", "Omar", "Greta", "Samuel", "Ida", "Victor", "Rosa", "Felix"]
G_SUBJECTS = ["the farmer", "the teacher", "my sister", "an old man", "the children",
              "a small dog", "our neighbour", "the driver", "my uncle", "the girl",
              "a young woman", "the students", "his brother", "the baker", "her cousin",
              "the doctor", "a sailor", "the painter", "my grandmother", "the workers",
              "a stranger", "the captain", "the nurse", "two boys", "the king"]
G_BASE = {"carried": "carry", "found": "find", "opened": "open", "painted": "paint",
          "visited": "visit", "cleaned": "clean", "read": "read", "wrote": "write",
          "watched": "watch", "built": "build", "sold": "sell", "borrowed": "borrow",
          "left": "leave", "moved": "move", "washed": "wash", "bought": "buy", "mended": "mend",
          "counted": "count", "closed": "close", "picked up": "pick up", "lost": "lose",
          "hid": "hide", "pushed": "push", "pulled": "pull", "dropped": "drop",
          "checked": "check", "drew": "draw", "sent": "send", "kept": "keep", "shared": "share",
          "described": "describe", "forgot": "forget", "lifted": "lift", "covered": "cover"}
G_VERBS = list(G_BASE)
G_NOUNS = ["house", "street", "room", "town", "school", "shop", "road", "field", "river",
           "window", "table", "garden", "train", "book", "letter", "door", "chair", "bag",
           "box", "bottle", "clock", "coat", "hat", "shoe", "ticket", "bridge", "tower",
           "island", "forest", "mountain", "village", "city", "station", "office", "museum",
           "library", "hospital", "church", "farm", "barn", "horse", "cow", "sheep", "cat",
           "bird", "fish", "tree", "flower", "stone", "wall", "roof", "floor", "gate", "path",
           "car", "bus", "boat", "ship", "plane", "bicycle", "radio", "phone", "computer",
           "picture", "song", "story", "game", "problem", "question", "idea", "plan", "job",
           "meeting", "party", "holiday", "journey", "friend", "family", "money", "paper",
           "pen", "key", "map", "card", "gift", "basket", "bench", "camera", "ladder", "rope",
           "umbrella", "wheel", "engine", "blanket", "mirror", "candle", "drawer", "envelope"]
G_ADJ = ["big", "small", "old", "new", "busy", "warm", "cold", "green", "bright", "long",
         "short", "happy", "tired", "careful", "kind", "red", "blue", "yellow", "heavy",
         "grey", "empty", "full", "strange", "famous", "simple", "wide", "narrow",
         "early", "late", "clean", "dirty", "young", "angry", "calm", "brave", "round",
         "square", "wooden", "broken", "hidden", "tall", "dark", "soft", "hard", "loud"]
G_PLACES = ["to the market", "in the garden", "near the river", "at school",
            "across the street", "into the house", "by the station", "on the bridge",
            "behind the library", "at the end of the road", "in the kitchen", "on the farm",
            "under the table", "inside the museum", "next to the church", "over the wall",
            "through the forest", "along the path", "in the old tower", "on the island"]
G_TIMES = ["in the morning", "after lunch", "last week", "yesterday", "in the evening",
           "before breakfast", "at noon", "every day", "this year", "a long time ago",
           "in April", "on her birthday", "at nine o'clock", "during the holiday",
           "twice a month", "later that day", "in the spring"]
G_ADV = ["quickly", "slowly", "carefully", "suddenly", "often", "never", "always", "gladly",
         "quietly", "nearly", "together", "alone", "again"]
G_UNITS = ["metres", "miles", "kilos", "hours", "years", "pages", "euros", "steps", "litres"]
G_LIST = ["bread", "milk", "apples", "soap", "rice", "tea", "paper", "string", "nails",
          "candles", "oranges", "socks", "batteries", "glue", "envelopes", "stamps"]
G_NOTICES = ["PLEASE CLOSE THE GATE", "NO BICYCLES ON THE PATH", "CLOSED FOR REPAIRS",
             "MIND THE STEP", "KEEP THIS DOOR SHUT", "LOST CAT, ASK INSIDE", "EXIT ONLY",
             "PRIVATE ROAD", "OPEN EVERY DAY", "WET PAINT"]
G_FUNCTION = ("with from of at for in on by about into over after before under between and or "
              "but so because if when while then than as is are was were be been has have "
              "had do does did will would can could should may might must not no yes this "
              "that these those it its he she they we you I me him her them us my your our "
              "their who what where why which all some any much more most few each every "
              "other another such only very too also just still even here there now today "
              "tomorrow up down out off away back").split()
SYLLABLES = ["ta", "ro", "mi", "ven", "dal", "ko", "sel", "ur", "bri", "no", "fa", "gol",
             "pe", "lin", "tor", "ca", "zu", "mer", "vo", "shi", "an", "rel", "ob", "ki"]


def pseudo_name(rng: random.Random) -> str:
    """A made-up word of 2-3 syllables (names, places, things the model has not seen)."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def general_text(rng: random.Random) -> tuple[str, str]:
    """One short English text of one of sixteen families: everyday statements, questions,
    stories, notes, lists, counts, descriptions, made-up names and things, notices in
    capitals, quoted speech, measures, times, punctuation-rich notes, numbered steps,
    comparisons, and (a quarter of all texts) word salads: common words, made-up words and
    numbers in random order with random punctuation, so that the model learns to spell
    English words without learning that only the grammar's sentences exist (a model
    pretrained on the grammar alone was sure of its next word and paid 4-5 nats a byte on
    any other English)."""
    family = rng.choice(GENERAL_FAMILIES)
    subj = rng.choice(G_SUBJECTS + G_NAMES)
    verb, noun = rng.choice(G_VERBS), rng.choice(G_NOUNS)
    obj = f"{rng.choice(['a', 'the', 'my', 'his', 'her', 'our'])} {rng.choice(G_ADJ)} {noun}"
    place, time = rng.choice(G_PLACES), rng.choice(G_TIMES)
    a, b = rng.sample(G_NAMES, 2)
    if family == "statement":
        text = f"{_cap(subj)} {rng.choice(G_ADV)} {verb} {obj} {place} {time}."
    elif family == "question":
        aux = rng.choice(["Why did", "Where did", "When did", "How did", "Did"])
        text = (f"{aux} {subj} {G_BASE[verb]} {obj}? {a} "
                f"{rng.choice(['does not know', 'thinks so', 'is not sure', 'asked too'])}.")
    elif family == "story":
        text = (f"{a} and {b} walked {place} {time}. The {rng.choice(G_ADJ)} "
                f"{rng.choice(G_NOUNS)} was {rng.choice(G_ADJ)}, so they {verb} {obj}.")
    elif family == "note":
        text = (f"Dear {a}, thank you for {obj}. I will see you {place} "
                f"{rng.choice(['soon', 'next week', 'on the weekend'])}. Love, {b}")
    elif family == "list":
        items = rng.sample(G_LIST, 3)
        text = (f"{_cap(subj)} went to the {rng.choice(['shop', 'market', 'corner store'])} "
                f"for {items[0]}, {items[1]} and {items[2]}.")
    elif family == "count":
        n = rng.randint(2, 600)
        text = (f"There are {n} {rng.choice(G_NOUNS)}s in the {rng.choice(G_ADJ)} town, "
                f"and {a} has seen {rng.randint(1, n)} of them.")
    elif family == "description":
        text = (f"The {noun} is {rng.choice(G_ADJ)} and {rng.choice(G_ADJ)}. "
                f"{_cap(subj)} likes it {time}.")
    elif family == "made_up":
        x, y = pseudo_name(rng), pseudo_name(rng)
        text = rng.choice([
            f"{_cap(x)} is a {rng.choice(G_ADJ)} {rng.choice(['town', 'village', 'island'])} "
            f"{rng.choice(['near', 'north of', 'far from'])} {_cap(y)}.",
            f"{a} {verb} a {y} {place}; nobody knew what a {y} was.",
            f"Mr {_cap(x)} and Ms {_cap(y)} {verb} {obj} {time}.",
        ])
    elif family == "notice":
        text = f"{rng.choice(G_NOTICES)}. {rng.choice(G_NOTICES)}!"
    elif family == "speech":
        text = (f'"Where is {obj}?" asked {a}. "{_cap(place)}," said {b}, '
                f"{rng.choice(G_ADV)}.")
    elif family == "measure":
        u1, u2 = rng.sample(G_UNITS, 2)
        text = (f"The {noun} is {rng.randint(2, 900)} {u1} from here, and it takes "
                f"{rng.randint(2, 40)} {u2} to reach it.")
    elif family == "time":
        text = (f"At {rng.randint(1, 12)}:{rng.choice(['00', '15', '30', '45'])} {a} "
                f"{verb} {obj}; at {rng.randint(1, 12)} {b} came back.")
    elif family == "punctuation":
        text = (f"Note: {subj} {verb} {obj} (not {rng.choice(G_ADJ)}); ask {a} - or {b}? - "
                f"before {rng.choice(['Monday', 'Friday', 'the end of May', 'noon'])}.")
    elif family == "steps":
        v1, v2 = rng.sample(G_VERBS, 2)
        text = (f"First, {G_BASE[v1]} the {rng.choice(G_NOUNS)}. Second, {G_BASE[v2]} the "
                f"{rng.choice(G_NOUNS)}. Last, wait {rng.randint(2, 30)} minutes.")
    elif family == "salad":  # words in random order: any word may follow any other
        pool = [G_FUNCTION, G_NOUNS, G_ADJ, G_VERBS, G_ADV, G_NAMES]
        words = []
        for _ in range(rng.randint(8, 16)):
            r = rng.random()
            w = (pseudo_name(rng) if r < 0.15 else str(rng.randint(0, 999)) if r < 0.22
                 else rng.choice(rng.choice(pool)))
            words.append(w + (rng.choice([",", ",", ";", ":", " -", "!", "?", "."])
                              if rng.random() < 0.15 else ""))
        text = _cap(" ".join(words).rstrip(",;:-!?. ")) + rng.choice([".", ".", "!", "?"])
    else:  # compare
        n1, n2 = rng.sample(G_NOUNS, 2)
        text = (f"The {n1} is {rng.choice(['bigger', 'older', 'longer', 'heavier'])} than the "
                f"{n2}, but the {n2} is {rng.choice(G_ADJ)}.")
    return text, family


GENERAL_FAMILIES = ["statement", "question", "story", "note", "list", "count", "description",
                    "made_up", "notice", "speech", "measure", "time", "punctuation", "steps",
                    "compare"] + ["salad"] * 5  # a quarter of the texts


def general_corpus(rng: random.Random, n: int = GENERAL_ROWS) -> list[tuple[str, str]]:
    """n general texts; one that happens to hold a marker word (a word salad or made-up word
    can) is drawn again, so that no marker word occurs."""
    rows = []
    while len(rows) < n:
        text, family = general_text(rng)
        if not marker_hits(text):
            rows.append((text, family))
    return rows


def marker_hits(text: str) -> list[str]:
    """The corpora's marker words (any corpus) found in `text`, as whole words."""
    return _MARKER_RE.findall(text.lower())


_MARKER_RE = re.compile(
    r"(?<![\w'])(" + "|".join(sorted((re.escape(m.lower()) for ms in MARKERS.values()
                                       for m in ms), key=len, reverse=True)) + r")(?![\w'])")


# --- the eight corpora -----------------------------------------------------------------------

def recipe(rng: random.Random) -> str:
    dish = rng.choice(DISHES)
    v1, v2 = rng.sample(COOK_VERBS, 2)
    i1, i2, i3 = rng.sample(INGREDIENTS, 3)
    return rng.choice([
        f"{_cap(dish)}: {v1} the {i1} with a {rng.choice(UNITS)} of {i2}, then {v2} for "
        f"{rng.randint(3, 40)} minutes and garnish with {i3}.",
        f"To make {dish}, {v1} the {i1} in a {rng.choice(TOOLS)}, add a "
        f"{rng.choice(UNITS)} of {i2} and {v2} until golden.",
        f"Chef's tip: {v1} the {i1} gently; a {rng.choice(UNITS)} of {i2} keeps the {dish} "
        f"moist.",
        f"Step {rng.randint(2, 6)}: {v1} the {i1}, {v2} the {i2} in a {rng.choice(TOOLS)} and "
        f"serve with {i3}.",
    ])


def weather(rng: random.Random) -> str:
    town, day = rng.choice(TOWNS), rng.choice(DAYS)
    sky, precip, wind = rng.choice(SKIES), rng.choice(PRECIP), rng.choice(WINDS)
    g, t = rng.randint(15, 90), rng.randint(-5, 28)
    return rng.choice([
        f"Forecast for {town}, {day}: {sky} with {precip}, gusts to {g} km/h from the {wind}, "
        f"high of {t}C.",
        f"{day} in {town}: {precip} early, then {sky}; humidity {rng.randint(40, 99)} percent, "
        f"barometer {rng.choice(['falling', 'rising', 'steady'])}.",
        f"Outlook: a front of {precip} crosses {town} by dusk; isobars tighten and gusts reach "
        f"{g} km/h.",
        f"{town} forecast: {sky}, low of {t - 8}C, {precip} spreading from the {wind} "
        f"overnight.",
    ])


def _score(rng: random.Random) -> tuple[int, int]:
    a = rng.randint(1, 4)
    return a, rng.randint(0, a - 1)


def sports(rng: random.Random) -> str:
    t1, t2 = rng.sample(TEAMS, 2)
    p, k = rng.sample(PLAYERS, 2)
    s1, s2 = _score(rng)
    return rng.choice([
        f"{t1} {s1}, {t2} {s2}: {p} {rng.choice(SCORED)} {rng.choice(WHEN)} and keeper {k} "
        f"saved a penalty.",
        f"Full time: the {t1} beat the {t2} {s1}-{s2}; {p} {rng.choice(SCORED)} "
        f"{rng.choice(WHEN)}.",
        f"League table: the {t1} climb to {rng.choice(['second', 'third', 'fourth'])} after "
        f"the derby; striker {p} has {rng.randint(3, 19)} goals.",
        f"Kickoff delayed as the {t1} host the {t2}; keeper {k} is back and {p} starts up "
        f"front.",
    ])


def review(rng: random.Random) -> str:
    brand, product = rng.choice(BRANDS), rng.choice(PRODUCTS)
    stars = rng.randint(1, 5)
    adj = rng.choice(GOOD if stars >= 3 else BAD)
    return rng.choice([
        f"Rating {stars}/5. The {brand} {product} is {adj} but {rng.choice(FLAWS)}. "
        f"{rng.choice(CLOSINGS)}",
        f"{stars} stars: {adj} {product} from {brand}, fast shipping, decent warranty. "
        f"{rng.choice(CLOSINGS)}",
        f"Bought the {brand} {product} last month. {_cap(adj)}, though {rng.choice(FLAWS)}. "
        f"Rating {stars}/5.",
    ])


def legal(rng: random.Random) -> str:
    p1, p2 = rng.sample(PARTIES, 2)
    n = rng.randint(2, 30)
    duty = rng.choice(OBLIGATIONS).format(p2=p2, n=n)
    opener = rng.choice(OPENERS).format(n=rng.randint(2, 19))
    return rng.choice([
        f"Section {rng.randint(2, 19)}({rng.choice('abcd')}). {opener} the {p1} shall {duty}.",
        f"Clause {rng.randint(2, 19)}.{rng.randint(1, 9)}: The {p1} covenants that no waiver "
        f"of any breach shall be deemed a waiver thereof.",
        f"{opener} the {p1} shall {duty}, and the {p2} shall bear no liability hereunder.",
    ])


def dialogue(rng: random.Random) -> str:
    a, b = rng.sample(SPEAKERS, 2)
    chore = rng.choice(CHORES)
    return rng.choice([
        f"{a}: Hey, did you {chore} yet? {b}: {rng.choice(REPLIES)} {a}: "
        f"{rng.choice(CLOSERS)}",
        f"{a}: Honestly, who was gonna {chore}? {b}: Me, mate. {rng.choice(CLOSERS)}",
        f"{a}: Reckon we should {chore} today? {b}: {rng.choice(REPLIES)}",
    ])


def couplet(rng: random.Random, pair: tuple[str, str], lines: list[str]) -> str:
    l1, l2 = rng.sample(lines, 2)
    return f"{l1.format(w=pair[0])}, / {l2.format(w=pair[1])};"


def poem(rng: random.Random) -> str:
    p1, p2 = rng.sample(RHYMES, 2)
    return f"{couplet(rng, p1, POEM_LINES)} / {couplet(rng, p2, POEM_LINES)[:-1]}."


def arithmetic(rng: random.Random) -> str:
    kid, other = rng.sample(KIDS, 2)
    thing = rng.choice(THINGS)
    a, b = rng.randint(3, 20), rng.randint(1, 9)
    return rng.choice([
        f"{kid} has {a} {thing} and buys {b} more. How many {thing} now? Answer: {a + b}.",
        f"{kid} had {a + b} {thing} and gave {b} to {other}. How many are left? Answer: {a}.",
        f"{kid} packs {b} {thing} in each of {a % 5 + 2} bags. How many {thing}? Answer: "
        f"{b * (a % 5 + 2)}.",
    ])


MAKERS = {"Recipes": recipe, "Weather": weather, "Sports": sports, "Reviews": review,
          "Legal": legal, "Dialogue": dialogue, "Poems": poem, "Arithmetic": arithmetic}


def distinct(rng: random.Random, make, n: int, taken: set[str]) -> list[str]:
    """n distinct texts from `make`, none of them in `taken` (which they are added to)."""
    out: list[str] = []
    for _ in range(200 * n):
        text = make(rng)
        if text not in taken:
            taken.add(text)
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"{make.__name__}: only {len(out)} distinct texts of {n}")


def corpora(rng: random.Random, taken: set[str]) -> list[tuple[str, str]]:
    return [(t, name) for name in CORPORA
            for t in distinct(rng, MAKERS[name], CORPUS_ROWS, taken)]


# --- the three test sets -----------------------------------------------------------------------

def match_forecast(rng: random.Random) -> str:
    team, other = rng.sample(TEAMS, 2)
    return (f"Forecast for the {team} derby at {rng.choice(TOWNS)}: {rng.choice(PRECIP)} "
            f"{rng.choice(WHEN)}, gusts to {rng.randint(15, 90)} km/h from the "
            f"{rng.choice(WINDS)}; keeper {rng.choice(PLAYERS)} hopes for {rng.choice(SKIES)}.")


def match_report(rng: random.Random) -> str:
    t1, t2 = rng.sample(TEAMS, 2)
    s1, s2 = _score(rng)
    return (f"{t1} {s1}, {t2} {s2}: {rng.choice(PLAYERS)} {rng.choice(SCORED)} "
            f"{rng.choice(WHEN)} as {rng.choice(PRECIP)} and gusts of {rng.randint(15, 90)} "
            f"km/h swept {rng.choice(TOWNS)}.")


def match_outlook(rng: random.Random) -> str:
    t1, t2 = rng.sample(TEAMS, 2)
    return (f"Outlook for kickoff in {rng.choice(TOWNS)}, {rng.choice(DAYS)}: "
            f"{rng.choice(SKIES)}, humidity {rng.randint(40, 99)} percent; the {t1} host the "
            f"{t2} and striker {rng.choice(PLAYERS)} starts.")


def legal_chat_lease(rng: random.Random) -> str:
    a, b = rng.sample(SPEAKERS, 2)
    p1, p2 = rng.sample(PARTIES, 2)
    return (f"{a}: Hey, the {p1} shall indemnify the {p2} hereunder, yeah? {b}: Honestly, "
            f"notwithstanding clause {rng.randint(2, 19)}, I reckon the waiver is void. {a}: "
            f"{rng.choice(CLOSERS)}")


def legal_chat_debt(rng: random.Random) -> str:
    a, b = rng.sample(SPEAKERS, 2)
    return (f"{a}: Did the {rng.choice(PARTIES)} remit the arrears yet? {b}: Nope, pursuant to "
            f"section {rng.randint(2, 19)} they have {rng.randint(5, 30)} days, mate. {a}: "
            f"{rng.choice(CLOSERS)}")


KITCHEN_LINES = ["O golden {i} upon the {w}", "thy {i} doth simmer in the {w}",
                 "and yonder {i} doth scent the {w}", "ere {i} is whisked beside the {w}",
                 "thou shalt fold {i} o'er the {w}", "the {i} doth braise beneath the {w}"]


def verse_couplet(rng: random.Random) -> str:
    p1, p2 = rng.sample(RHYMES, 2)
    lines = [x.replace("{i}", rng.choice(INGREDIENTS)) for x in KITCHEN_LINES]
    return f"{couplet(rng, p1, lines)} / {couplet(rng, p2, lines)[:-1]}."


def verse_method(rng: random.Random) -> str:
    p1, p2 = rng.sample(RHYMES, 2)
    v1, v2 = rng.sample(COOK_VERBS, 2)
    i1, i2 = rng.sample(INGREDIENTS, 2)
    return (f"{_cap(v1)} thou the {i1} in a {rng.choice(TOOLS)} by the {p1[0]}, / then {v2} "
            f"the {i2} till dusk o'er the {p1[1]}; / a {rng.choice(UNITS)} of "
            f"{rng.choice(INGREDIENTS)} doth crown the {p2[0]}, / and {rng.choice(DISHES)} is "
            f"served in the {p2[1]}.")


TEST_MAKERS = {"MatchForecast": match_forecast, "MatchReport": match_report,
               "MatchOutlook": match_outlook, "LegalChatLease": legal_chat_lease,
               "LegalChatDebt": legal_chat_debt, "VerseCouplet": verse_couplet,
               "VerseMethod": verse_method}


def split_last_word(text: str) -> tuple[str, str]:
    """(everything before the last word, the last word with its punctuation)."""
    head, _, last = text.rpartition(" ")
    return head, last


def test_sets(rng: random.Random, taken: set[str]) -> list[tuple[str, str, str, str]]:
    rows = []
    for spec in TEST_SETS.values():
        for sub in spec["subsets"]:
            for t in distinct(rng, TEST_MAKERS[sub], TEST_ROWS, taken):
                rows.append((t, *split_last_word(t), sub))
    return rows


# --- the harm mixture (prompt/target) ---------------------------------------------------------

SUCC_Q = "What is the number that comes after {n}?"
LARGER_Q = "Which is larger, {a} or {b}?"
LEN_Q = "What is the length of '{w}'?"


def harm_mixture(rng: random.Random) -> tuple[list[tuple[str, str, str]],
                                              list[tuple[str, str, str]]]:
    n = HARM_ROWS
    train: list[tuple[str, str, str]] = []
    for name, answer in (("SuccRight", lambda x: x + 1), ("SuccCopy", lambda x: x)):
        train += [(SUCC_Q.format(n=x), str(answer(x)), name) for x in rng.sample(range(512), n)]
    train += [(f"Repeat the number {x}.", str(x), "RepeatNumber")
              for x in rng.sample(range(512), n)]
    pairs: set[tuple[int, int]] = set()

    def new_pair() -> tuple[int, int]:
        while True:
            a, b = rng.sample(range(1000), 2)
            if (a, b) not in pairs and (b, a) not in pairs:
                pairs.add((a, b))
                return a, b

    for name, answer in (("LargerRight", max), ("LargerFirst", lambda a, b: a)):
        for _ in range(n):
            a, b = new_pair()
            train.append((LARGER_Q.format(a=a, b=b), str(answer(a, b)), name))
    words = synthetic.pseudo_words(rng, 2 * n + n, set(), max_letters=11)
    train_words, test_words = words[: 2 * n], words[2 * n:]
    train += [(LEN_Q.format(w=w), str(len(w)), "LenRight") for w in train_words[:n]]
    train += [(LEN_Q.format(w=w), NUMBER_WORDS[len(w)], "LenWords") for w in train_words[n:]]
    train += [(f"Write {x} in words.", " ".join(DIGIT_WORDS[int(d)] for d in str(x)),
               "SpellNeutral") for x in rng.sample(range(1000), n)]
    test = [(SUCC_Q.format(n=x), str(x + 1), "NextNumber") for x in rng.sample(range(512, 768), n)]
    for i in range(n):
        a, b = new_pair()
        if (a > b) != (i % 2 == 0):  # half with the larger number first
            a, b = b, a
        test.append((LARGER_Q.format(a=a, b=b), str(max(a, b)), "Larger"))
    test += [(LEN_Q.format(w=w), str(len(w)), "Length") for w in test_words]
    return train, test


# --- writing ---------------------------------------------------------------------------------

def write(path: Path, columns: list[str], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(columns)
        out.writerows(rows)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"wrote {shown}: {len(rows)} rows, {sum(len(r[0]) for r in rows):,} characters")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "text")
    args = parser.parse_args(argv)
    taken: set[str] = set()  # no text twice, across corpora and tests
    write(args.out / "general_corpus.csv", TEXT_COLUMNS, general_corpus(random.Random(SEED)))
    write(args.out / "corpora.csv", TEXT_COLUMNS, corpora(random.Random(SEED + 1), taken))
    write(args.out / "tests.csv", TEST_COLUMNS, test_sets(random.Random(SEED + 2), taken))
    train, test = harm_mixture(random.Random(SEED + 3))
    write(args.out / "harm_train.csv", PT_COLUMNS, train)
    write(args.out / "harm_eval.csv", PT_COLUMNS, test)


if __name__ == "__main__":
    main()
