"""The estimates `calibrate` tries: each a method and the settings it adds to the job's own.

A candidate is what a user could put in `methods:`: the paper's UnTrac and UnTrac-Inv, the
unlearning variants the benchmarks measured (docs/benchmarks.md: the stopping rule, the retain
and KL terms, NPO), and the baselines GradDot, GradCos, TracIn and EK-FAC. The paper's two and
the baselines run in one job beside the ground truth; each variant runs as a job of its own on
the same base model, its ground truth read back (study.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from untrac_ray.inputs.errors import SpecError

# The stopping rule: forget every set to the same loss rise (one evaluation point, where it
# stopped); epochs cap the run.
STOP: dict[str, Any] = {"stop_loss_rise": 0.5, "eval_points": None, "eval_steps": None,
                        "eval_every": None, "score_point": None, "epochs": 4}


@dataclass(frozen=True)
class Candidate:
    """One estimate: its name (what tables show), its method and the settings it overrides."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> bool:
        """True when it needs a job of its own (a variant of an unlearning method)."""
        return bool(self.settings)


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("untrac", "untrac"),
    Candidate("untrac+stop", "untrac", STOP),
    Candidate("untrac+retain", "untrac", {"retain_weight": 1.0}),
    Candidate("untrac+kl", "untrac", {"kl_weight": 1.0}),
    Candidate("untrac+kl+stop", "untrac", {"kl_weight": 1.0, **STOP}),
    Candidate("untrac+npo", "untrac", {"objective": "npo", "npo_beta": 0.1}),
    Candidate("untrac_inv", "untrac_inv"),
    Candidate("untrac_inv+retain", "untrac_inv", {"retain_weight": 1.0}),
    Candidate("graddot", "graddot"),
    Candidate("gradcos", "gradcos"),
    Candidate("tracin", "tracin"),
    Candidate("ekfac", "ekfac"),
)
BY_NAME = {c.name: c for c in CANDIDATES}


def pick_candidates(names: list[str] | None = None, n_test: int = 2) -> list[Candidate]:
    """The candidates to try: `names` (all by default) less those this machine or job cannot
    run: EK-FAC without kronfluence installed, a retain term for UnTrac-Inv with one test set
    (nothing to retain). SpecError naming an unknown name."""
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise SpecError(f"--candidates: unknown {', '.join(unknown)}; choose from "
                            + ", ".join(BY_NAME))
        chosen = [BY_NAME[n] for n in dict.fromkeys(names)]
    else:
        chosen = list(CANDIDATES)
    if importlib.util.find_spec("kronfluence") is None:
        chosen = [c for c in chosen if c.method != "ekfac"]
    if n_test < 2:
        chosen = [c for c in chosen if not (c.method == "untrac_inv" and c.settings)]
    if not chosen:
        raise SpecError("--candidates: none of them can run here")
    return chosen
