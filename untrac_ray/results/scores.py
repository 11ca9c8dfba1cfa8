"""The one table of scores: how well every estimate agrees with every ground truth a run has,
in one schema, written once by the runner and read by `run`, `show`, `compare`, the report,
the verdict, `tune`'s objective and the MLflow metrics (results/score_views.py turns it into
what they print; nothing downstream knows a score by name).

A score is a correlation, per test set, between an estimate's prediction and a measured truth
over some points, then the mean over test sets (scoring.group_mean: subsets of a test set
first). Each score is a `ScoreKind` in SCORES:

- pearson, spearman: the estimate's cells against leave-dataset-out's over the training sets
  (the paper's score); pearson's interval is Fisher's for one correlation over K points.
- lds: the linear datamodeling score over models retrained on subsets of the training sets
  (results/lds.py): the sum of the cells of the sets a subset leaves out against the
  retrained model's loss, Spearman over the subsets; its interval is a bootstrap over them.

Two rules make a score one that an estimate knowing nothing cannot pass:

- A prediction that is constant over the points carries no ranking, so its correlation is 0
  (not undefined, which would drop it from the mean). Undefined stays for a truth that is
  constant or a cell that is missing: those test sets are counted and named (`undefined`).
- Every table carries two reference rows on the same points: `constant_cells` (every cell
  1.0) and `random_cells` (cells drawn from a normal distribution, the mean over
  `REFERENCE_DRAWS` draws, its interval the 2.5-97.5% range over the draws). `margin` is an
  estimate's lead over the higher of the two, with a *paired* bootstrap interval: the same
  resampled points for the estimate and the reference (training sets for pearson and
  spearman, subsets for lds). "Beats", "within" and "informative" mean that interval.

The ceiling rows (kind CEILING) say how far the truth's seed noise lets any estimate go:
lds from subsets retrained under a second seed (results/lds.py), pearson from leave-dataset-
out's seeds (sqrt(1 - 1/snr_mean^2), the same attenuation). Leave-dataset-out's own cells are
scored by LDS too (kind TRUTH): how far retraining on subsets is the sum of one-set effects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from untrac_ray.inputs.spec_sections import GROUND_TRUTH
from untrac_ray.results.lds import ceiling, predictions, subset_truth
from untrac_ray.results.scoring import (
    ALL_CELLS,
    MEAN_OVER_TESTS,
    ground_truth_noise,
    pearson_interval,
    pearson_rows,
    spearman_rows,
)

COLUMNS = ["method", "kind", "point", "headline", "score", "test_set", "value", "low", "high",
           "margin", "margin_low", "margin_high", "n", "undefined"]
ESTIMATE, REFERENCE, TRUTH, CEILING = "estimate", "reference", "ground truth", "ceiling"
CONSTANT, RANDOM = "constant_cells", "random_cells"
CEILING_METHOD = "ceiling"
REFERENCE_DRAWS = 100  # random cells drawn for the random reference row
ROW_TITLES = {CONSTANT: "constant cells", RANDOM: "random cells",
              CEILING_METHOD: "ceiling (seed noise)"}
ARTIFACT = "score_table"  # the table's name among a run's artifacts


@dataclass(frozen=True)
class ScoreKind:
    """One score: what it is called and what a reader needs to read it."""

    name: str
    title: str  # a column heading
    truth: str  # what it is measured against, in words
    over: str  # the correlation and its points, in words ({n} is their number)
    points: str  # its points, in a word or two ("training sets")
    interval: str  # how its 95% interval is made ("" for none)
    claim: str = ""  # what an informative score says the estimate does (the verdict's words)
    more: str = ""  # how to make its ground truth less noisy


SCORES = {
    "pearson": ScoreKind("pearson", "Pearson", "leave-dataset-out",
                         "Pearson over the {n} training sets", "training sets", "Fisher's",
                         "tracks leave-dataset-out", "more seeds in methods.ldo.seeds"),
    "spearman": ScoreKind("spearman", "Spearman", "leave-dataset-out",
                          "Spearman over the {n} training sets", "training sets", ""),
    "lds": ScoreKind("lds", "LDS", "retraining on subsets",
                     "Spearman over {n} models retrained on subsets of the training sets, of "
                     "the sum of the cells of the sets each leaves out against its test loss",
                     "retrained subsets", "bootstrap over the subsets",
                     "predicts retraining on subsets of the training sets",
                     "more seeds in methods.lds.seeds, or more methods.lds.subsets"),
}


def correlate(pred: np.ndarray, truth: np.ndarray, rank: bool) -> np.ndarray:
    """The correlation of each row of `pred` with the same row of `truth` (2-D, one shape):
    0 where the prediction is constant (it ranks nothing), NaN where the truth is constant
    or either side has a NaN (undefined)."""
    pred, truth = np.atleast_2d(pred), np.atleast_2d(truth)
    r = (spearman_rows if rank else pearson_rows)(pred, truth)
    with np.errstate(invalid="ignore"):
        defined = ~(np.isnan(pred).any(axis=1) | np.isnan(truth).any(axis=1)) & (
            np.ptp(truth, axis=1) > 0)
        flat = defined & (np.ptp(pred, axis=1) == 0)
    return np.where(flat, 0.0, np.where(defined, r, np.nan))


def mean_over_tests(per_test: np.ndarray, test: list[str],
                    groups: Mapping[str, str] | None) -> np.ndarray:
    """scoring.group_mean over the last axis (one column per test set) of each row: the
    subsets of a test set averaged first; NaN left out; NaN where a row has none."""
    per_test = np.atleast_2d(per_test)
    groups = groups or {}
    keys = list(dict.fromkeys(groups.get(t, t) for t in test))
    cols = [[j for j, t in enumerate(test) if groups.get(t, t) == key] for key in keys]
    with np.errstate(invalid="ignore"), _quiet():
        by_group = np.stack([np.nanmean(per_test[:, c], axis=1) for c in cols], axis=1)
        return np.nanmean(by_group, axis=1)


class _quiet:
    """np.nanmean of an all-NaN slice warns; here that NaN is the answer."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


@dataclass
class Problem:
    """One score's points: a truth (points x test sets) and how an estimate's cells (train x
    test) become a prediction on the same points."""

    kind: ScoreKind
    truth: np.ndarray
    predict: object  # cells (train x test DataFrame) -> points x test sets
    rank: bool
    train: list[str]


def _resampled(pred: np.ndarray, truth: np.ndarray, picks: np.ndarray, rank: bool,
               test: list[str], groups) -> np.ndarray:
    """The mean over test sets of the correlation on each resample of the points (picks:
    resamples x points): one value per resample."""
    b, n = picks.shape
    p = pred[picks].transpose(0, 2, 1).reshape(b * pred.shape[1], n)
    t = truth[picks].transpose(0, 2, 1).reshape(b * pred.shape[1], n)
    per = correlate(p, t, rank).reshape(b, pred.shape[1])
    return mean_over_tests(per, test, groups)


def _picks(n: int, resamples: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """The resampled points (resamples x n indices) every interval and margin of one score
    uses, so that two estimates' resamples pair up; and the generator, drawn on after them."""
    rng = np.random.default_rng([seed, 11])
    return rng, rng.integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _cells(table: pd.DataFrame, method: str, point: int) -> pd.DataFrame:
    rows = table[(table["method"] == method) & (table["point"] == point)]
    return rows.pivot_table(index="train_set", columns="test_set", values="influence")


def _problems(table: pd.DataFrame, train: list[str], test: list[str],
              truth: pd.DataFrame | None, subsets: pd.DataFrame | None) -> dict[str, Problem]:
    out = {}
    if truth is not None:
        measured = truth.reindex(index=train, columns=test).to_numpy(dtype=float)

        def as_cells(est: pd.DataFrame) -> np.ndarray:
            return est.reindex(index=train, columns=test).to_numpy(dtype=float)

        out["pearson"] = Problem(SCORES["pearson"], measured, as_cells, False, train)
        out["spearman"] = Problem(SCORES["spearman"], measured, as_cells, True, train)
    if subsets is not None and not subsets.empty:
        losses, left_out = subset_truth(subsets, train)
        losses = losses.reindex(columns=test)
        out["lds"] = Problem(SCORES["lds"], losses.to_numpy(dtype=float),
                             lambda est: predictions(est, left_out, train, test), True, train)
    return out


def _row(method, kind, point, headline, score, test_set, value, n, low=np.nan, high=np.nan,
         undefined=""):
    return {"method": method, "kind": kind, "point": int(point), "headline": bool(headline),
            "score": score, "test_set": test_set, "value": float(value), "low": float(low),
            "high": float(high), "margin": np.nan, "margin_low": np.nan,
            "margin_high": np.nan, "n": int(n), "undefined": undefined}


def score_frame(table: pd.DataFrame, train: list[str], test: list[str],
                headline: Mapping[str, int] | None = None,
                groups: Mapping[str, str] | None = None, truth: pd.DataFrame | None = None,
                ldo_seeds: pd.DataFrame | None = None, subsets: pd.DataFrame | None = None,
                resamples: int = 1000, seed: int = 0, intervals: bool = True) -> pd.DataFrame:
    """The score table (COLUMNS) of every method in `table` against the ground truths given:
    `truth` (leave-dataset-out's matrix: pearson, spearman), `subsets` (plan_lds's rows: lds).
    Every point of every estimate gets its values per test set, their mean and (pearson,
    spearman) the pooled cells; the headline point (`headline[method]`, default its last) also
    its interval and paired margin over the reference rows. `intervals` False: values only,
    no reference rows (a search's objective each round)."""
    headline = dict(headline or {})
    problems = _problems(table, train, test, truth, subsets)
    rows: list[dict] = []
    methods = [m for m in dict.fromkeys(table["method"])]
    for name, prob in problems.items():
        scored = [m for m in methods if m != GROUND_TRUTH or name == "lds"]
        at_headline: dict[str, np.ndarray] = {}
        for method in scored:
            kind = TRUTH if method == GROUND_TRUTH else ESTIMATE
            points = sorted(int(p) for p in table.loc[table["method"] == method, "point"]
                            .unique())
            top = int(headline.get(method, points[-1]))
            for point in points:
                pred = prob.predict(_cells(table, method, point))
                rows += _value_rows(method, kind, point, point == top, prob, pred, test,
                                    groups)
                if point == top:
                    at_headline[method] = pred
        if intervals and at_headline:
            rows += _with_references(prob, at_headline, test, groups, resamples, seed, rows)
    if intervals and rows:
        rows += _ceilings(problems, subsets, ldo_seeds, groups)
    return pd.DataFrame(rows, columns=COLUMNS)


def _value_rows(method, kind, point, headline, prob: Problem, pred: np.ndarray,
                test: list[str], groups) -> list[dict]:
    """Per test set, their mean (the undefined ones named) and, for a score over the
    training sets, all cells pooled."""
    n = len(prob.truth)
    per = correlate(pred.T, prob.truth.T, prob.rank)
    undefined = ",".join(t for t, v in zip(test, per, strict=True) if v != v)
    out = [_row(method, kind, point, headline, prob.kind.name, t, v, n)
           for t, v in zip(test, per, strict=True)]
    out.append(_row(method, kind, point, headline, prob.kind.name, MEAN_OVER_TESTS,
                    mean_over_tests(per, test, groups)[0], n, undefined=undefined))
    if prob.kind.name != "lds":
        pooled = correlate(pred.ravel()[None], prob.truth.ravel()[None], prob.rank)[0]
        out.append(_row(method, kind, point, headline, prob.kind.name, ALL_CELLS, pooled,
                        pred.size))
    return out


def _with_references(prob: Problem, at_headline: dict[str, np.ndarray], test: list[str],
                     groups, resamples: int, seed: int, rows: list[dict]) -> list[dict]:
    """The reference rows of one score, and the interval and paired margin of every method's
    mean at its headline point (filled into `rows`), all on the same resampled points."""
    name, n = prob.kind.name, len(prob.truth)
    rng, picks = _picks(n, resamples, seed)
    draws = {m: _resampled(p, prob.truth, picks, prob.rank, test, groups)
             for m, p in at_headline.items()}
    shape = (len(prob.train), len(test))

    def predict(cells: np.ndarray) -> np.ndarray:
        return prob.predict(pd.DataFrame(cells, index=prob.train, columns=test))

    const = predict(np.ones(shape))
    draws[CONSTANT] = _resampled(const, prob.truth, picks, prob.rank, test, groups)
    values_random, per_random, draws_random = [], [], []
    for _ in range(REFERENCE_DRAWS):
        pred = predict(rng.standard_normal(shape))
        per = correlate(pred.T, prob.truth.T, prob.rank)
        per_random.append(per)
        values_random.append(mean_over_tests(per, test, groups)[0])
        draws_random.append(_resampled(pred, prob.truth, picks, prob.rank, test, groups))
    with _quiet():
        draws[RANDOM] = np.nanmean(np.stack(draws_random), axis=0)
    out = _value_rows(CONSTANT, REFERENCE, 0, True, prob, const, test, groups)
    random_per = np.nanmean(np.stack(per_random), axis=0) if per_random else np.full(
        len(test), np.nan)
    low, high = _percentiles(np.array(values_random))
    out += [_row(RANDOM, REFERENCE, 0, True, name, t, v, n) for t, v in
            zip(test, random_per, strict=True)]
    out.append(_row(RANDOM, REFERENCE, 0, True, name, MEAN_OVER_TESTS,
                    float(np.nanmean(values_random)), n, low, high))
    refs = {CONSTANT: out[len(test)]["value"], RANDOM: out[-1]["value"]}
    for row in [*rows, *out]:
        if row["score"] != name or row["test_set"] != MEAN_OVER_TESTS or not row["headline"]:
            continue
        method = row["method"]
        if row["kind"] != REFERENCE:
            if prob.kind.interval == "Fisher's":
                row["low"], row["high"] = pearson_interval(row["value"], n) or (np.nan, np.nan)
            elif prob.kind.interval:
                row["low"], row["high"] = _percentiles(draws[method])
        if method in (CONSTANT, RANDOM):
            continue
        margins = []
        for ref, ref_value in refs.items():
            lo, hi = _percentiles(draws[method] - draws[ref])
            margins.append((lo, row["value"] - ref_value, hi))
        lo, mid, hi = min(margins, key=lambda m: (np.nan_to_num(m[0], nan=np.inf), -m[1]))
        row["margin"], row["margin_low"], row["margin_high"] = mid, lo, hi
    return out


def _ceilings(problems: dict[str, Problem], subsets: pd.DataFrame | None,
              ldo_seeds: pd.DataFrame | None, groups) -> list[dict]:
    """How far the truth's seed noise lets any estimate's score go (module docstring)."""
    out = []
    if "lds" in problems and subsets is not None and (subsets["role"] == "noise").any():
        top, per_test = ceiling(subsets, groups)
        n = int(subsets.loc[subsets["role"] == "noise", "subset"].nunique())
        out += [_row(CEILING_METHOD, CEILING, 0, True, "lds", t, v, n)
                for t, v in per_test.items()]
        out.append(_row(CEILING_METHOD, CEILING, 0, True, "lds", MEAN_OVER_TESTS, top, n))
    if "pearson" in problems and ldo_seeds is not None and not ldo_seeds.empty:
        noise = ground_truth_noise(ldo_seeds)
        snr = noise["snr_mean"]
        top = float(np.sqrt(max(0.0, 1 - 1 / snr**2))) if snr == snr and snr > 0 else np.nan
        if noise["n"] >= 2:
            out.append(_row(CEILING_METHOD, CEILING, 0, True, "pearson", MEAN_OVER_TESTS,
                            top, noise["n"]))
    return out


def paired_difference(table: pd.DataFrame, a: str, b: str, score: str, train: list[str],
                      test: list[str], headline: Mapping[str, int] | None = None,
                      groups: Mapping[str, str] | None = None,
                      truth: pd.DataFrame | None = None, subsets: pd.DataFrame | None = None,
                      resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Method a's mean `score` minus method b's, each at its headline point, with the paired
    bootstrap 95% interval (the same resampled points as score_frame's intervals): what
    "a beats b" (low > 0) and "a is within b's reach" (high >= 0) mean."""
    prob = _problems(table, train, test, truth, subsets)[score]
    headline = dict(headline or {})
    _, picks = _picks(len(prob.truth), resamples, seed)
    values, draws = [], []
    for method in (a, b):
        point = int(headline.get(method, table.loc[table["method"] == method, "point"].max()))
        pred = prob.predict(_cells(table, method, point))
        values.append(mean_over_tests(correlate(pred.T, prob.truth.T, prob.rank), test,
                                      groups)[0])
        draws.append(_resampled(pred, prob.truth, picks, prob.rank, test, groups))
    low, high = _percentiles(draws[0] - draws[1])
    return float(values[0] - values[1]), low, high
