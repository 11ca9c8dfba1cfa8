"""Leave-dataset-out with the steps held (methods.ldo.steps): the ground truth retrained for
training.epochs over the remaining rows (`epochs`, the paper's) and for the full training's
optimizer steps (`same`), side by side on jobs whose training sets differ in size.

Per job and seed (the seed drawn as ``benchmarks/accuracy.py`` draws it: accuracy.run_seed,
accuracy.seeded_spec):

1. the job as it is, every estimate with LDO under ``steps: epochs``;
2. LDO alone under ``steps: same`` on the same base model (cached, not trained again), the
   same LDO seeds.

Printed, and written as tidy rows to ``--out`` (default ``benchmarks/results/ldo_steps.csv``):
the optimizer steps of the retrainings under each (from the runs' ``ldo_seeds``); the mean
Pearson between the two truths (the epochs truth scored as an estimate against the same one);
the mean truth cell of the larger half of the training sets (by rows) and of the smaller
half, under each; and every estimate's mean Pearson against each truth at its headline point
(all from the one score table, results/scores.py: score 'pearson', test set '__mean__',
headline rows; a test set's subsets averaged first).

Run: ``.venv/bin/python benchmarks/ldo_steps.py --jobs jobs/text_corpora_unequal.yaml
jobs/synthetic_b_unequal.yaml --seed 1``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.results.score_views import headline_rows
from untrac_ray.results.scores import ESTIMATE, score_frame
from untrac_ray.run.job_setup import prepare_data
from untrac_ray.run.runner import run_job

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/accuracy.py
import accuracy  # noqa: E402

MODES = ("epochs", "same")
OUT = ROOT / "benchmarks" / "results" / "ldo_steps.csv"


def ldo_only(spec: JobSpec, seed: int, ldo_seeds: int | None, steps: str) -> JobSpec:
    """The seed's job with leave-dataset-out alone, under methods.ldo.steps `steps`."""
    s = accuracy.seeded_spec(spec, seed, ldo_seeds)
    s.methods.ldo.steps = steps
    for method in s.methods.estimates():
        setattr(s.methods, method, None)
    return accuracy.with_settings(s, [])  # validated again


def truth_cells(truth: pd.DataFrame, method: str) -> pd.DataFrame:
    """A truth matrix as a method's cells (point 0), to score it as an estimate."""
    return pd.DataFrame([{"method": method, "point": 0, "step": 0, "train_set": k,
                          "test_set": j, "influence": float(truth.loc[k, j])}
                         for k in truth.index for j in truth.columns])


def mean_pearsons(table: pd.DataFrame, truth: pd.DataFrame, train: list[str], test: list[str],
                  headline: dict[str, int], groups: dict[str, str]) -> dict[str, float]:
    """Each method's mean Pearson (over test sets) with `truth` at its headline point."""
    frame = score_frame(table, train, test, headline, groups, truth=truth, intervals=False)
    top = headline_rows(frame)
    top = top[(top["score"] == "pearson") & (top["kind"] == ESTIMATE)]
    return dict(zip(top["method"], top["value"].astype(float), strict=True))


def run_job_file(job: Path, seed: int, uri: str, ldo_seeds: int | None) -> list[dict]:
    """Both truths and every estimate of one job and seed, as tidy rows."""
    spec = load_spec(job)
    spec.methods.ldo.steps = "epochs"
    accuracy.share_pretraining(spec)
    train, test = [d.name for d in spec.data.train], [d.name for d in spec.data.test]
    groups = spec.data.test_groups()

    start = time.perf_counter()
    first = accuracy.run_seed(spec, seed, uri, ldo_seeds)
    seconds = {"epochs": time.perf_counter() - start}
    print(f"[{time.strftime('%H:%M:%S')}] {spec.name} seed {seed}: the job with LDO epochs "
          f"took {seconds['epochs'] / 60:.1f} min", file=sys.stderr, flush=True)
    start = time.perf_counter()
    second = run_job(ldo_only(spec, seed, ldo_seeds, "same"), uri)
    seconds["same"] = time.perf_counter() - start
    print(f"[{time.strftime('%H:%M:%S')}] {spec.name} seed {seed}: LDO same took "
          f"{seconds['same'] / 60:.1f} min", file=sys.stderr, flush=True)

    seeds_rows = {"epochs": first.ldo_seeds, "same": pd.DataFrame(second.extras["ldo_seeds"])}
    seeds_rows["same"]["influence"] = (seeds_rows["same"]["loss_without"]
                                       - seeds_rows["same"]["loss_full"])
    truths = {mode: accuracy.truth_from(rows).reindex(index=train, columns=test)
              for mode, rows in seeds_rows.items()}
    data = prepare_data(spec)
    rows_of = {k: data.n_rows[k] for k in train}
    by_size = sorted(train, key=lambda k: -rows_of[k])
    big, small = by_size[:len(train) // 2], by_size[len(train) // 2:]

    table = first.outcome.table
    estimates = table[table["method"] != "ldo"]
    scores = first.outcome.scores
    headline = {r.method: int(r.point) for r in headline_rows(scores).itertuples()
                if r.kind == ESTIMATE}
    common = {"job": spec.name, "seed": seed}
    out = [{**common, "measure": "sets", "method": "", "truth": "", "value": len(train),
            "detail": " ".join(f"{k}={rows_of[k]}" for k in by_size)}]
    for mode in MODES:
        ldo = seeds_rows[mode]
        out += [{**common, "measure": "steps_full", "method": "ldo", "truth": mode,
                 "value": float(ldo["steps_full"].iloc[0]), "detail": ""},
                {**common, "measure": "steps_without_min", "method": "ldo", "truth": mode,
                 "value": float(ldo["steps"].min()), "detail": ""},
                {**common, "measure": "steps_without_max", "method": "ldo", "truth": mode,
                 "value": float(ldo["steps"].max()), "detail": ""},
                {**common, "measure": "seconds", "method": "ldo", "truth": mode,
                 "value": seconds[mode], "detail": "the whole job" if mode == "epochs"
                 else "LDO alone"}]
        truth = truths[mode]
        out += [{**common, "measure": f"mean_cell_{half}", "method": "ldo", "truth": mode,
                 "value": float(truth.loc[sets].to_numpy().mean()), "detail": " ".join(sets)}
                for half, sets in (("big", big), ("small", small))]
        for method, value in mean_pearsons(estimates, truth, train, test, headline,
                                           groups).items():
            out.append({**common, "measure": "pearson", "method": method, "truth": mode,
                        "value": value, "detail": f"point {headline.get(method, '')}"})
    between = mean_pearsons(truth_cells(truths["epochs"], "truth_epochs"), truths["same"],
                            train, test, {}, groups)["truth_epochs"]
    out.append({**common, "measure": "pearson_truths", "method": "ldo", "truth": "epochs~same",
                "value": between, "detail": ""})
    return out


def print_rows(rows: pd.DataFrame) -> None:
    for (job, seed), part in rows.groupby(["job", "seed"], sort=False):
        get = part.set_index(["measure", "method", "truth"])["value"]
        sizes = part[part["measure"] == "sets"]["detail"].iloc[0]
        print(f"\n=== {job}, seed {seed}: training sets by rows {sizes} ===")
        print(f"{'':<34}{'epochs':>10}{'same':>10}")
        for label, measure in (("steps, full training", "steps_full"),
                               ("steps without a set, min", "steps_without_min"),
                               ("steps without a set, max", "steps_without_max"),
                               ("mean truth cell, larger half", "mean_cell_big"),
                               ("mean truth cell, smaller half", "mean_cell_small"),
                               ("seconds (job / LDO alone)", "seconds")):
            values = [get.get((measure, "ldo", m), np.nan) for m in MODES]
            fmt = "{:>10.0f}" if measure.startswith(("steps", "seconds")) else "{:>+10.4f}"
            print(f"{label:<34}" + "".join(fmt.format(v) for v in values))
        print(f"Pearson between the two truths (mean over test sets): "
              f"{get[('pearson_truths', 'ldo', 'epochs~same')]:+.3f}")
        print(f"\n{'estimate: mean Pearson against':<34}{'epochs':>10}{'same':>10}{'change':>10}")
        pearson = part[part["measure"] == "pearson"]
        for method in dict.fromkeys(pearson["method"]):
            e, s = (get[("pearson", method, m)] for m in MODES)
            print(f"{method:<34}{e:>+10.3f}{s:>+10.3f}{s - e:>+10.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=Path, nargs="+",
                        default=[ROOT / "jobs" / "text_corpora_unequal.yaml"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ldo-seeds", type=int, default=None,
                        help="LDO retrainings per truth (default: as many as the job lists)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: a SQLite file in a temporary folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--from-rows", type=Path, default=None,
                        help="print the rows of an earlier run again, run nothing")
    args = parser.parse_args(argv)
    if args.from_rows is not None:
        print_rows(pd.read_csv(args.from_rows, keep_default_na=False))
        return
    uri = args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='ldo-steps-')}/mlflow.db"
    rows: list[dict] = []
    for job in args.jobs:
        found = run_job_file(job, args.seed, uri, args.ldo_seeds)
        rows += found
        frame = pd.DataFrame(rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)  # each job's rows as soon as it is done
        print_rows(pd.DataFrame(found))
    print(f"\nrows: {args.out}; tracking {uri}")


if __name__ == "__main__":
    main()
