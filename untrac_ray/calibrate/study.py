"""One draw of a calibration: the ground truth and every candidate on one base model, scored.

A draw with seed s trains the job's model with s, retrains it for the ground truth (LDO once
per training set, the LDS on random subsets drawn with s) and runs, in that same job, the
paper's UnTrac and UnTrac-Inv and the baselines among the candidates. Each variant then runs
as a job of its own on the same base model with that job's LDO as its ground truth
(`ground_truth.run_id`), nothing retrained again. `run_unit` runs one such job durably (the
driver: a nested run, skipped when finished, resumed when killed); this module only says
which jobs a draw is and scores what they return with the one score table
(results/scores.py), every candidate under its own name, at its point fixed in advance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from untrac_ray.calibrate.candidates import Candidate
from untrac_ray.inputs.errors import UntracError
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_methods import (
    EkfacSpec,
    GradientSpec,
    LdoSpec,
    LdsSpec,
    UnlearnSpec,
)
from untrac_ray.inputs.spec_sections import GroundTruthSpec
from untrac_ray.results.score_views import headline_rows
from untrac_ray.results.scores import CEILING, ESTIMATE, paired_difference, score_frame
from untrac_ray.results.scoring import truth_matrix

GROUND = "ground truth"  # the label of a draw's first job (the truth and the plain methods)
METHOD_SPECS = {"untrac": UnlearnSpec, "untrac_inv": UnlearnSpec, "graddot": GradientSpec,
                "gradcos": GradientSpec, "tracin": GradientSpec, "ekfac": EkfacSpec}


@dataclass(frozen=True)
class Unit:
    """What one job of a draw returned: its run, its cells (method column: the candidate's
    name, LDO's own as `ldo`), the LDS subsets and LDO seeds of the ground-truth job, and its
    actor seconds per method label (JobOutcome.seconds_by_method: graddot+gradcos+tracin)."""

    run_id: str
    table: pd.DataFrame
    seconds: dict[str, float]
    lds_subsets: pd.DataFrame | None = None
    ldo_seeds: pd.DataFrame | None = None


    @classmethod
    def of(cls, outcome) -> Unit:
        """What a finished run_job returned (run/runner.py JobOutcome), as a unit."""
        extras = outcome.extras
        return cls(outcome.run_id, outcome.table, dict(outcome.seconds_by_method),
                   pd.DataFrame(extras["lds_subsets"]) if "lds_subsets" in extras else None,
                   pd.DataFrame(extras["ldo_seeds"]) if "ldo_seeds" in extras else None)


RunUnit = Callable[[str, JobSpec], Unit]


@dataclass
class Draw:
    """A scored draw: the cells of every candidate that ran, what it cost, and why a candidate
    did not run."""

    seed: int
    train: list[str]
    test: list[str]
    groups: dict[str, str]
    table: pd.DataFrame
    subsets: pd.DataFrame | None
    truth: pd.DataFrame | None
    ldo_seeds: pd.DataFrame | None
    seconds: dict[str, float] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def scores(self) -> pd.DataFrame:
        """The one score table of every candidate (and LDO's own cells) on this draw."""
        return score_frame(self.table, self.train, self.test, groups=self.groups,
                           truth=self.truth, ldo_seeds=self.ldo_seeds, subsets=self.subsets)

    def difference(self, a: str, b: str, score: str) -> tuple[float, float, float]:
        """a's score minus b's with the paired bootstrap interval (scores.paired_difference)."""
        return paired_difference(self.table, a, b, score, self.train, self.test,
                                 groups=self.groups, truth=self.truth, subsets=self.subsets)


def _seeded(spec: JobSpec, seed: int) -> JobSpec:
    spec = spec.model_copy(deep=True)
    spec.training.seed = seed
    spec.ground_truth = None
    return spec


def own_settings(spec: JobSpec, method: str):
    """The job's settings of a method, or that method's defaults where the job has none."""
    current = getattr(spec.methods, method)
    return current if current is not None else METHOD_SPECS[method]()


def ground_job(spec: JobSpec, seed: int, candidates: list[Candidate], lds: LdsSpec) -> JobSpec:
    """The draw's first job: LDO (the job's settings, one retraining per set with `seed`), the
    LDS (`lds`, its subsets drawn and retrained with `seed`) and every plain candidate (the
    job's own settings of it, or the defaults), unlearning seeded with `seed`."""
    s = _seeded(spec, seed)
    own = spec.methods
    methods = {"ldo": (own.ldo or LdoSpec()).model_copy(update={"seeds": [seed]}),
               "lds": lds.model_copy(update={"seeds": [seed], "sample_seed": seed})}
    for c in candidates:
        if c.variant:
            continue
        current = own_settings(spec, c.method)
        if hasattr(current, "seed"):
            current = current.model_copy(update={"seed": seed})
        methods[c.method] = current
    for name in type(own).model_fields:
        setattr(s.methods, name, methods.get(name))
    return type(s).model_validate(s.model_dump(mode="python"))


def variant_job(spec: JobSpec, seed: int, candidate: Candidate, truth_run: str,
                tracking_uri: str) -> JobSpec:
    """A variant's job: its method alone, the job's settings of it with the variant's on top,
    on the draw's base model, scored against the draw's LDO (read back, not retrained)."""
    s = _seeded(spec, seed)
    settings = own_settings(spec, candidate.method).model_copy(
        update={**candidate.settings, "seed": seed})
    for name in type(spec.methods).model_fields:
        setattr(s.methods, name, settings if name == candidate.method else None)
    s.ground_truth = GroundTruthSpec(run_id=truth_run, tracking_uri=tracking_uri)
    return type(s).model_validate(s.model_dump(mode="python"))


def seconds_of(seconds: dict[str, float], method: str) -> float:
    """A method's actor seconds (the gradient baselines share one label: their sum)."""
    for label, value in seconds.items():
        if method in label.split("+"):
            return value
    return float("nan")


def _renamed(table: pd.DataFrame, method: str, name: str) -> pd.DataFrame:
    part = table[table["method"] == method].copy()
    part["method"] = name
    return part


def run_draw(spec: JobSpec, seed: int, candidates: list[Candidate], lds: LdsSpec,
             run_unit: RunUnit, tracking_uri: str) -> Draw:
    """Every job of one draw through `run_unit`, the cells gathered under the candidates'
    names. A variant the job refuses (UntracError: a setting that cannot apply to it) is
    skipped with its reason; the ground-truth job's failure stops the draw."""
    ground = run_unit(GROUND, ground_job(spec, seed, candidates, lds))
    train, test = [d.name for d in spec.data.train], [d.name for d in spec.data.test]
    parts = [_renamed(ground.table, "ldo", "ldo")]
    parts += [_renamed(ground.table, c.method, c.name) for c in candidates if not c.variant]
    seconds = {c.name: seconds_of(ground.seconds, c.method) for c in candidates
               if not c.variant}
    seconds["ldo"], seconds["lds"] = (seconds_of(ground.seconds, "ldo"),
                                      seconds_of(ground.seconds, "lds"))
    runs = {GROUND: ground.run_id}
    skipped: dict[str, str] = {}
    for c in candidates:
        if not c.variant:
            continue
        try:
            unit = run_unit(c.name, variant_job(spec, seed, c, ground.run_id, tracking_uri))
        except UntracError as err:
            skipped[c.name] = str(err).splitlines()[0]
            continue
        parts.append(_renamed(unit.table, c.method, c.name))
        seconds[c.name], runs[c.name] = seconds_of(unit.seconds, c.method), unit.run_id
    table = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    truth = (truth_matrix(table).reindex(index=train, columns=test)
             if (table["method"] == "ldo").any() else None)
    ldo_seeds = ground.ldo_seeds
    if ldo_seeds is not None and "influence" not in ldo_seeds:
        ldo_seeds = ldo_seeds.assign(influence=ldo_seeds["loss_without"]
                                     - ldo_seeds["loss_full"])
    return Draw(seed, train, test, spec.data.test_groups(), table, ground.lds_subsets, truth,
                ldo_seeds, seconds, runs, skipped)


def draw_rows(draw: Draw, candidates: list[Candidate], phase: str) -> list[dict]:
    """One row per candidate that ran: its headline LDS and Pearson with their intervals and
    paired leads over the reference rows, and the ceilings, for the calibration's table."""
    top = headline_rows(draw.scores())
    if top.empty:
        return []
    ceilings = {r.score: r.value for r in top[top["kind"] == CEILING].itertuples()}
    rows = []
    for c in candidates:
        mine = top[(top["method"] == c.name) & (top["kind"] == ESTIMATE)]
        if mine.empty:
            continue
        row = {"seed": draw.seed, "phase": phase, "candidate": c.name, "method": c.method,
               "run_id": draw.runs.get(c.name if c.variant else GROUND, ""),
               "seconds": draw.seconds.get(c.name, float("nan"))}
        for r in mine.itertuples():
            for part in ("value", "low", "high", "margin", "margin_low", "margin_high", "n"):
                row[f"{r.score}_{part}"] = getattr(r, part)
            row[f"{r.score}_ceiling"] = ceilings.get(r.score, float("nan"))
        rows.append(row)
    return rows
