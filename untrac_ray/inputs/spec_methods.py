"""The methods' settings in a job spec (`methods:`): each method with its own section, the
unlearning settings of UnTrac and UnTrac-Inv first.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from untrac_ray.inputs.spec_sections import (
    GROUND_TRUTHS,
    KRONFLUENCE_INSTALL,
    METHODS,
    Optimizer,
    StrictModel,
)


class UnlearnSpec(StrictModel):
    """Gradient-ascent settings of one method (the unlearning loop in compute/unlearning.py).

    Where a trajectory is evaluated: `eval_points: P` evaluates every set at 1/P, 2/P ... P/P of
    its own schedule, so that sets of different sizes line up by progress (a bigger set takes
    more steps per point). `eval_steps` / `eval_every` name absolute steps instead; they are
    counted on the longest trajectory, and shorter ones are evaluated at the same fractions of
    their own schedule (equal-size sets: exactly the steps named). methods/schedule.py resolves
    both.
    """

    optimizer: Optimizer = "adam"
    learning_rate: float = Field(5e-5, ge=0)
    batch_size: int = Field(1, gt=0)
    micro_batch_size: int | None = Field(None, gt=0, description="split batches to save memory")
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    max_grad_norm: float | None = Field(None, gt=0)
    eval_points: int | None = Field(
        None, gt=0, description="evaluate at 1/P ... P/P of each set's own schedule"
    )
    eval_steps: list[int] | None = Field(None, description="steps at which to evaluate")
    eval_every: int | None = Field(None, gt=0)
    score_point: int | None = Field(
        None, gt=0, description="the evaluation point whose scores are the headline, fixed in "
        "advance (default: the last)",
    )
    seed: int = 0
    # Variants that bring unlearning a set closer to "trained without it" (docs/job-spec.md,
    # unlearning variants). The defaults are the paper's UnTrac.
    retain_weight: float = Field(
        0.0, ge=0, description="each ascent step also descends on a batch of the sets that are "
        "kept (UnTrac: the other training sets; UnTrac-Inv: the other test sets), weighted by "
        "this, so that skills they share with the unlearned set stay")
    retain_batch_size: int | None = Field(
        None, gt=0, description="rows of that batch (default: batch_size)")
    stop_loss_rise: float | None = Field(
        None, gt=0, description="stop once the unlearned set's own loss rose this much (mean "
        "token loss) above the base model's, so every set is forgotten to the same degree; "
        "max_steps or epochs cap the run; one evaluation point, where it stopped")
    stop_check_every: int = Field(
        1, gt=0, description="steps between checks of the stopping rule (each evaluates the "
        "unlearned set's evaluation rows)")
    objective: Literal["ascent", "npo"] = Field(
        "ascent", description="what each step does to the unlearned set: ascent (the "
        "paper's gradient ascent on its mean token loss) or npo (negative preference "
        "optimization, arXiv 2404.05868: each row's ascent weighted by 2*sigmoid(-beta * its "
        "summed loss rise over the base model's), which slows as the row is forgotten; keeps "
        "a frozen copy of the base model)")
    npo_beta: float = Field(0.1, gt=0, description="NPO's beta (objective: npo)")
    kl_weight: float = Field(
        0.0, ge=0, description="each step also lowers the KL divergence from the base "
        "model's next-token distribution to the model's on a batch of the kept sets (as "
        "retain_weight's), weighted by this; keeps a frozen copy of the base model")
    ensemble: int = Field(
        1, ge=1, description="unlearn each set with this many seeds (seed, seed+1, ...: batch "
        "orders and dropout) and average the cells; costs that many times the compute")

    @field_validator("eval_steps")
    @classmethod
    def _positive_steps(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None:
            if not steps:
                raise ValueError("eval_steps must not be empty")
            if any(s <= 0 for s in steps):
                raise ValueError("eval_steps must be positive step numbers")
        return steps

    @model_validator(mode="after")
    def _one_kind_of_schedule(self) -> UnlearnSpec:
        if self.eval_points is not None and (self.eval_steps or self.eval_every):
            raise ValueError("eval_points: give either eval_points (progress through each "
                             "set's schedule) or eval_steps/eval_every (absolute steps)")
        if self.stop_loss_rise is not None and (
                (self.eval_points or 1) > 1 or self.eval_steps or self.eval_every):
            raise ValueError("stop_loss_rise: a trajectory that stops by its loss has one "
                             "evaluation point, where it stops; drop eval_points/eval_steps/"
                             "eval_every")
        if self.eval_points is not None and self.score_point is not None and (
                self.score_point > self.eval_points):
            raise ValueError(f"score_point: {self.score_point} is beyond the last of "
                             f"{self.eval_points} eval_points")
        return self

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps for a dataset of n_rows: max_steps, else epochs over the rows."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(n_rows / self.batch_size)


# How long a retraining without some training sets runs (methods.ldo.steps, methods.lds.steps):
# epochs (the paper's): training.epochs over the rows that remain, so fewer optimizer steps
# than the full training; same: exactly as many optimizer steps as the full training took
# (the remaining rows seen more often), so a set's influence is not the steps it added.
RetrainSteps = Literal["epochs", "same"]
STEPS_DEFAULT = "epochs"
STEPS_HELP = ("epochs: training.epochs over the remaining rows (fewer steps when a set is "
              "left out); same: as many optimizer steps as the full training took")


class LdoSpec(StrictModel):
    """Leave-dataset-out retraining, the ground truth: one retraining per training set and seed.

    `steps` says how long the retraining without a set runs (RetrainSteps): on sets of
    unequal size, `epochs` leaves a big set's retraining with far fewer steps, and part of
    its influence is only the steps it added; `same` holds the step count."""

    seeds: list[int] | None = Field(
        None, description="training seeds; the ground truth is the mean over them "
        "(default: training.seed)", min_length=1,
    )
    steps: RetrainSteps = Field(STEPS_DEFAULT, description=STEPS_HELP)


class LdsSpec(StrictModel):
    """The linear datamodeling score at the level of datasets (results/lds.py, methods/plans.py
    plan_lds): retrain on `subsets` distinct random subsets of the training sets, each of
    exactly round(keep x K) sets (drawn with `sample_seed`), once per seed, and score how well
    each estimate's cells predict each retrained model's test losses (Spearman over the
    subsets, results/scores.py).

    `noise_subsets` of them are retrained once more under `noise_seed`: how far the test losses
    move with the seed alone gives the score's ceiling (the noise floor, as LDO's SNR)."""

    subsets: int = Field(32, ge=4, description="random subsets retrained (M; with few "
                         "training sets, all C(K, m) subsets of m sets when there are fewer)")
    keep: float = Field(0.5, gt=0, lt=1, description="share of the training sets each subset "
                        "keeps (alpha): exactly m = round(alpha x K) of the K sets")
    seeds: list[int] | None = Field(
        None, min_length=1, description="training seeds, each subset retrained with each "
        "(default: methods.ldo.seeds, else training.seed)")
    sample_seed: int = Field(0, description="seed of the subsets drawn")
    noise_subsets: int = Field(
        4, ge=0, description="subsets retrained again under noise_seed, for the ceiling")
    noise_seed: int | None = Field(None, description="default: the largest seed + 1")
    bootstrap: int = Field(1000, ge=100, description="resamples of the subsets for the "
                           "95% interval")
    steps: RetrainSteps = Field(STEPS_DEFAULT, description=STEPS_HELP + " (each subset's "
                                "retraining)")

    @model_validator(mode="after")
    def _noise_within(self) -> LdsSpec:
        if self.noise_subsets > self.subsets:
            raise ValueError(f"noise_subsets: {self.noise_subsets} is more than the "
                             f"{self.subsets} subsets")
        return self


class GradientSpec(StrictModel):
    """GradDot, GradCos and TracIn: dataset-level gradients accumulated over batches.

    `aggregate` is how a training set's examples add up. mean (the default, the paper's): the
    gradient of its mean token loss, every set on the same footing; sum: of its summed token
    loss, so a set with more tokens weighs more, as in a first-order view of training without
    it. On sets of unequal size (jobs/synthetic_b_unequal.yaml, docs/benchmarks.md) mean
    followed leave-dataset-out as well or slightly better. The test side is always the mean token
    loss that UnTrac measures. GradCos is the same under both (a cosine ignores scale).
    """

    batch_size: int = Field(32, gt=0)
    aggregate: Literal["sum", "mean"] = Field(
        "mean", description="training-set gradient of the mean or summed token loss"
    )


class EkfacSpec(StrictModel):
    """Influence functions with EK-FAC (kronfluence).

    Aggregated like the gradient baselines: the test side is the gradient of the test set's
    mean token loss; `aggregate` sum takes the training set's summed token loss (rows sampled
    by max_train_examples are scaled up to the whole set's tokens), mean its mean token loss.
    """

    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = "ekfac"
    damping: float | None = Field(None, gt=0, description="default: kronfluence's heuristic")
    batch_size: int = Field(16, gt=0)
    max_train_examples: int | None = Field(
        None, gt=0, description="rows per training set scored (default: all)"
    )
    aggregate: Literal["sum", "mean"] = Field(
        "mean", description="training-set influence of its mean or summed token loss"
    )


class MethodsSpec(StrictModel):
    """The methods to run, each with its own settings."""

    untrac: UnlearnSpec | None = None
    untrac_inv: UnlearnSpec | None = None
    ldo: LdoSpec | None = None
    lds: LdsSpec | None = None
    graddot: GradientSpec | None = None
    gradcos: GradientSpec | None = None
    tracin: GradientSpec | None = None
    ekfac: EkfacSpec | None = None

    @field_validator("ekfac")
    @classmethod
    def _kronfluence_installed(cls, value: EkfacSpec | None) -> EkfacSpec | None:
        if value is not None:
            import importlib.util

            if importlib.util.find_spec("kronfluence") is None:
                raise ValueError(
                    "method ekfac needs the kronfluence library, which is not installed; "
                    f"install it without its dependencies: {KRONFLUENCE_INSTALL}"
                )
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> MethodsSpec:
        if not self.enabled():
            raise ValueError("name at least one method: " + ", ".join(METHODS))
        return self

    @model_validator(mode="after")
    def _noise_seed_differs(self) -> MethodsSpec:
        lds = self.lds
        if lds is not None and lds.noise_subsets and lds.noise_seed is not None and (
                lds.noise_seed in self.lds_seeds(lds.noise_seed + 1)):
            raise ValueError(f"lds.noise_seed: {lds.noise_seed} is one of the seeds; the "
                             "ceiling needs the same subsets under another seed")
        return self

    def enabled(self) -> dict[str, Any]:
        """The requested methods by name, in a fixed order."""
        return {m: getattr(self, m) for m in METHODS if getattr(self, m) is not None}

    def estimates(self) -> list[str]:
        """The requested methods other than the ground truths (retraining)."""
        return [m for m in self.enabled() if m not in GROUND_TRUTHS]

    def retraining_seeds(self, default: int) -> list[int]:
        """Every seed that LDO or LDS retrains with (each needs its initial weights);
        `default`: training.seed."""
        seeds = list(self.ldo.seeds or [default]) if self.ldo is not None else []
        if self.lds is not None:
            seeds += self.lds_seeds(default) + [self.lds_noise_seed(default)] * bool(
                self.lds.noise_subsets)
        return list(dict.fromkeys(seeds))

    def lds_seeds(self, default: int) -> list[int]:
        """LDS's training seeds: its own, else LDO's, else training.seed."""
        assert self.lds is not None
        return list(self.lds.seeds or (self.ldo and self.ldo.seeds) or [default])

    def lds_noise_seed(self, default: int) -> int:
        """The seed of LDS's repeated subsets: noise_seed, else the largest seed + 1."""
        assert self.lds is not None
        seeds = self.lds_seeds(default)
        return self.lds.noise_seed if self.lds.noise_seed is not None else max(seeds) + 1


