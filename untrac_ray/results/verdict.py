"""How far to trust a run's answer, in a few lines: what `run`, `show` and the report end with.

Built only from what the run has: how well its estimates of the same cells agree (UnTrac
against UnTrac-Inv, an ensemble's seeds), and, with a ground truth, each estimate's headline
scores from the one score table (results/scores.py): the value with its 95% interval, its
paired lead over the reference rows (constant and random cells, which know nothing) and the
ceiling the truth's seed noise leaves.

An estimate is called informative only when its paired lead over both reference rows has a
95% interval above zero and the ceiling allows a judgement; with a ceiling below 0.5 or
below the score itself, the verdict says the ground truth is too noisy to judge and how to
make it less so. The words for an informative score (`claim`) come from scores.SCORES.

The wording follows what the benchmarks measured (docs/benchmarks.md): agreement below
scoring.AGREEMENT_LOW went with inaccurate estimates, but agreement above it did not make them
accurate (on dataset A, UnTrac and UnTrac-Inv agreed at +0.9 and both missed leave-dataset-out);
no verdict claims more than that.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from untrac_ray.results.score_views import headline_rows, interval, scores_in
from untrac_ray.results.scores import CEILING, ESTIMATE, SCORES, TRUTH
from untrac_ray.results.scoring import AGREEMENT_LOW
from untrac_ray.results.tables import method_title

TRACKS = 0.5  # a lower bound above this: the estimate tracks the ground truth on this job
NOISY = 0.5  # a ceiling below this: the ground truth is too noisy to judge an estimate
HOW_TO_CHECK = (
    "no ground truth in this run: to measure which estimate to trust for it, `untrac-ray "
    "calibrate JOB` retrains a small proxy of this job and scores every estimate against it, "
    "then writes the job with the method that did best; or give ground_truth.run_id of a run "
    "that retrained without each set (methods.ldo)")


class Line(str):
    """One line of the verdict, plain text; `warning` when it says the answer cannot be relied
    on as it stands (what `show`, `run` and the report draw in yellow)."""

    warning: bool

    def __new__(cls, text: str, warning: bool = False) -> Line:
        line = super().__new__(cls, text)
        line.warning = warning
        return line


def _label(key: str) -> str:
    if key == "untrac_vs_untrac_inv":
        return "UnTrac and UnTrac-Inv"
    if key.endswith("_seeds"):
        return f"{method_title(key.removesuffix('_seeds'))}'s seeds"
    return key


def _score_line(r, top: float) -> Line:
    """One estimate's headline score against one ground truth, and what it means."""
    kind = SCORES[r.score]
    name, value = method_title(r.method), float(r.value)
    if value != value:
        return Line(f"{name}: {kind.title} against {kind.truth} undefined on every test set "
                    "(a constant ground truth or missing cells)", warning=True)
    span = interval(r.low, r.high)
    text = (f"{name}: {kind.title} {value:+.2f}" + (f", 95% interval {span}" if span else "")
            + f" over {int(r.n)} {kind.points}")
    lead = interval(r.margin_low, r.margin_high)
    if lead:
        text += f"; above constant and random cells by {r.margin:+.2f} {lead} (paired)"
    if top == top:
        text += f"; ceiling {top:+.2f} from the seed noise"
    if top == top and (top < NOISY or top < value):
        return Line(f"{text}: the ground truth is too noisy to judge it; make it less so with "
                    f"{kind.more}", warning=True)
    if kind.interval == "Fisher's" and not span:
        return Line(f"{text}: too few training sets to tell", warning=True)
    if r.margin_low == r.margin_low and r.margin_low > 0:
        if r.low == r.low and r.low > TRACKS:
            return Line(f"{text}: {kind.claim} on this job")
        return Line(f"{text}: carries signal (it beats estimates that know nothing), but its "
                    f"interval reaches below {TRACKS}: it {kind.claim} only weakly here",
                    warning=True)
    if r.margin_high == r.margin_high and r.margin_high < 0:
        return Line(f"{text}: below estimates that know nothing; it ranks the training sets "
                    "backwards here: do not rank training sets by it", warning=True)
    return Line(f"{text}: no better than constant or random cells; no evidence it "
                f"{kind.claim} here: do not rank training sets by it", warning=True)


def verdict(agreement: Mapping[str, float], scores: pd.DataFrame | None,
            calibration: dict | None = None) -> list[Line]:
    """The verdict's lines: agreement, each estimate against each ground truth the run has
    (the one score table), and what that means; with no ground truth, what the calibration
    the job cites found on a proxy of it, or else how to get a ground truth."""
    lines = []
    for key, value in agreement.items():
        if value != value:
            continue
        if value < AGREEMENT_LOW:
            lines.append(Line(f"{_label(key)} disagree (Pearson {value:+.2f} over the cells): "
                              "treat both as uncertain", warning=True))
        else:
            lines.append(Line(f"{_label(key)} agree (Pearson {value:+.2f} over the cells); "
                              "agreement alone does not show they are right"))
    top = headline_rows(scores)
    judged = [s for s in scores_in(scores) if SCORES[s].interval]
    if top.empty or not judged:
        lines.append(calibration_line(calibration) if calibration else Line(HOW_TO_CHECK))
        return lines
    ceilings = {r.score: float(r.value) for r in top[top["kind"] == CEILING].itertuples()}
    for method in dict.fromkeys(top.loc[top["kind"] == ESTIMATE, "method"]):
        for s in judged:
            mine = top[(top["method"] == method) & (top["score"] == s)]
            if not mine.empty:
                lines.append(_score_line(mine.iloc[0], ceilings.get(s, float("nan"))))
    for r in top[(top["kind"] == TRUTH) & top["score"].isin(judged)].itertuples():
        kind = SCORES[r.score]
        lines.append(Line(f"{method_title(r.method)}'s own cells (the ground truth of one set "
                          f"at a time) reach {kind.title} {r.value:+.2f}: how far the "
                          f"{kind.truth} is the sum of one-set effects"))
    return lines


def calibration_line(summary: dict) -> Line:
    """What a calibration (untrac-ray calibrate: a proxy of the job, retrained) found, in one
    line: the estimate it chose with its held-out score and its lead over the next, or that no
    estimate was distinguishable there."""
    score = SCORES[summary["score"]]
    name = method_title(summary["chosen"])
    span = interval(summary["low"], summary["high"]) or "(no interval)"
    text = f"on a proxy of this job, {name} predicted retraining best: {score.title} " \
           f"{summary['value']:+.2f} {span}"
    if not summary.get("margin_low", float("nan")) > 0:
        return Line(f"on a proxy of this job, no estimate was distinguishable from constant or "
                    f"random cells (the best, {name}: {score.title} {summary['value']:+.2f} "
                    f"{span})", warning=True)
    if summary.get("next"):
        lead = interval(summary["difference_low"], summary["difference_high"]) or ""
        text += f", ahead of {method_title(summary['next'])} by " \
                f"{summary['difference']:+.2f} {lead}".rstrip()
        if not summary["difference_low"] > 0:
            text += f" (paired: {name} is not told apart from it there)"
    return Line(text)
