"""Sensitivity of UnTrac and UnTrac-Inv to the unlearning learning rate and batch size: the
paper's sensitivity study at CPU scale on the synthetic dataset A, run as grid searches with
`untrac-ray tune`'s machinery (Ray Tune trials, MLflow parent and child runs).

Three grid searches over learning rate x batch size, each scored by the mean Pearson
correlation with leave-dataset-out at the last step of the trajectory (the point fixed in
advance, as the paper reports):

1. UnTrac with Adam (one epoch of gradient ascent over each training set);
2. UnTrac with SGD (the same grid, to see whether the robustness is Adam's);
3. UnTrac-Inv with Adam (20 steps on the test set, batches up to the whole 256-row set).

The leave-dataset-out ground truth is computed once by the first search (or read from
``--ground-truth RUN_ID``) and reused by the others. Each search's parent run holds the
heatmap of its grid (figures/objective_grid.png); the first also gets this report
(sensitivity.txt) and the three heatmaps (figures/sensitivity_<search>.png).

The paper's findings checked at the end: UnTrac is robust with Adam and higher learning
rates (better than SGD, better than the lowest rate, little spread over batch sizes at the
higher rates); UnTrac-Inv needs large batches (the objective rises with the batch size). A
difference of mean Pearson within 0.1 is called inconclusive: with four training sets a
correlation moves by that much from noise alone. The report ends with the ground truth's own
signal to noise (its spread over training sets against the seed noise of the LDO mean).

    .venv/bin/python benchmarks/sensitivity.py [--job JOB] [--quick] [--ldo-seeds 0,1,2]
                                               [--ground-truth RUN_ID] [--inv-batches 8,32,128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from untrac_ray.inputs.loading import load_spec, parse_spec  # noqa: E402
from untrac_ray.search.driver import run_search  # noqa: E402
from untrac_ray.search.reporting import SearchReporter  # noqa: E402


class Progress(SearchReporter):
    """Stages and finished trials on stderr."""

    def stage(self, message: str) -> None:
        print(f"  > {message}", file=sys.stderr, flush=True)

    def trial_update(self, view) -> None:
        if view.status not in ("pending", "running"):
            print(f"    trial {view.index}: {view.config} {view.status} objective "
                  f"{view.objective:+.3f}", file=sys.stderr, flush=True)


def search_spec(base: dict, method: str, settings: dict, lrs: list[float],
                batches: list[int], ground_truth: str | None, uri: str) -> dict:
    """The job with one unlearning method and a grid search over its lr x batch size."""
    spec = {k: v for k, v in base.items() if k not in ("search", "ground_truth")}
    spec["methods"] = {method: settings}
    if ground_truth:
        spec["ground_truth"] = {"run_id": ground_truth, "tracking_uri": uri}
    else:
        spec["methods"]["ldo"] = base["methods"].get("ldo") or {}
    spec["search"] = {"algorithm": "grid",
                      "space": {f"{method}.learning_rate": lrs, f"{method}.batch_size": batches}}
    return spec


def grid(outcome, method: str) -> pd.DataFrame:
    t = outcome.trials
    table = t.pivot_table(index=f"{method}.learning_rate", columns=f"{method}.batch_size",
                          values="objective", aggfunc="first", dropna=False)
    table.index.name, table.columns.name = "learning rate", "batch size"
    return table


def verdict(effect: float, margin: float = 0.1) -> str:
    """HOLDS / DOES NOT HOLD when an effect clears the margin, else INCONCLUSIVE (with four
    training sets a correlation moves by more than that from noise alone)."""
    if not np.isfinite(effect):
        return "INCONCLUSIVE (no finite objective)"
    if effect > margin:
        return f"HOLDS ({effect:+.2f})"
    if effect < -margin:
        return f"DOES NOT HOLD ({effect:+.2f})"
    return f"INCONCLUSIVE ({effect:+.2f}, within +-{margin})"


def findings(adam: pd.DataFrame, sgd: pd.DataFrame, inv: pd.DataFrame) -> list[str]:
    """The paper's claims, checked on the three grids (NaN: a failed or constant trial)."""
    mean = lambda frame: float(np.nanmean(frame.to_numpy(dtype=float)))  # noqa: E731
    low, high = adam.index.min(), adam.index[adam.index > adam.index.min()]
    spread = float(adam.loc[high].std(axis=1).mean())
    small, large = inv.columns.min(), inv.columns.max()
    return [
        f"UnTrac, Adam better than SGD (grid means {mean(adam):+.3f} vs {mean(sgd):+.3f}): "
        + verdict(mean(adam) - mean(sgd)),
        f"UnTrac, Adam: higher learning rates {list(high)} better than {low:g} "
        f"({mean(adam.loc[high]):+.3f} vs {mean(adam.loc[[low]]):+.3f}): "
        + verdict(mean(adam.loc[high]) - mean(adam.loc[[low]])),
        f"UnTrac, Adam at the higher learning rates robust to the batch size (std over batch "
        f"sizes {spread:.3f}, robust below 0.15): " + ("HOLDS" if spread < 0.15 else
                                                         "DOES NOT HOLD"),
        f"UnTrac-Inv needs large batches (mean over learning rates at batch {large}: "
        f"{mean(inv[[large]]):+.3f}, at {small}: {mean(inv[[small]]):+.3f}): "
        + verdict(mean(inv[[large]]) - mean(inv[[small]])),
    ]


def truth_quality(gt: str, uri: str) -> str:
    """How far the ground truth stands above its own seed noise (when it has several seeds)."""
    from untrac_ray.results.runs import read_influence, read_run_table
    from untrac_ray.results.scoring import ground_truth_noise

    seeds = read_run_table(gt, uri, "ldo_seeds")
    if seeds is None or seeds["seed"].nunique() < 2:
        truth = read_influence(gt, uri)
        truth = truth[truth.method == "ldo"].pivot_table(index="train_set", columns="test_set",
                                                         values="influence")
        return (f"ground truth: spread over training sets {float(truth.std(axis=0).mean()):.3f}; "
                "one LDO seed, so its noise is unknown (--ldo-seeds 0,1,2 measures it)")
    q = ground_truth_noise(seeds.assign(influence=seeds.loss_without - seeds.loss_full))
    return (f"ground truth: spread over training sets {q['signal']:.3f}, seed noise of its mean "
            f"over {q['n']} LDO seeds {q['cell_std'] / np.sqrt(q['n']):.3f} (signal/noise "
            f"{q['snr_mean']:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(ROOT / "jobs" / "synthetic_a.yaml"))
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--ground-truth", help="an earlier run (or search) with an ldo matrix")
    parser.add_argument("--ldo-seeds", help="LDO training seeds, e.g. 0,1,2 (default: the "
                        "job's methods.ldo, else its training seed)")
    parser.add_argument("--inv-batches", help="UnTrac-Inv batch sizes, e.g. 8,32,128 (default "
                        "8,32,128,256; a batch larger than a test set is the whole set)")
    parser.add_argument("--quick", action="store_true", help="a 2 x 2 grid per method")
    args = parser.parse_args()

    base = load_spec(args.job).model_dump(mode="json")
    base["tracking"]["experiment"] = "untrac-ray-sensitivity"
    if args.ldo_seeds:
        base["methods"]["ldo"] = {"seeds": [int(x) for x in args.ldo_seeds.split(",")]}
    print(f"job {args.job}", file=sys.stderr)
    lrs = [1e-4, 1e-3] if args.quick else [1e-5, 1e-4, 1e-3]
    untrac_batches = [8, 32] if args.quick else [1, 8, 32]
    inv_batches = [16, 256] if args.quick else [8, 32, 128, 256]
    if args.inv_batches:
        inv_batches = [int(x) for x in args.inv_batches.split(",")]
    untrac = {**base["methods"]["untrac"], "optimizer": "adam", "epochs": 1, "max_steps": None,
              "eval_every": 8}
    inv = {**base["methods"]["untrac_inv"], "optimizer": "adam", "max_steps": 20,
           "eval_every": 5}
    runs = [("UnTrac, Adam", "untrac", untrac, untrac_batches),
            ("UnTrac, SGD", "untrac", {**untrac, "optimizer": "sgd"}, untrac_batches),
            ("UnTrac-Inv, Adam", "untrac_inv", inv, inv_batches)]
    start = time.time()
    gt, grids, outcomes, report = args.ground_truth, [], [], []
    for title, method, settings, batches in runs:
        print(f"{title}: learning rate {lrs} x batch size {batches}", file=sys.stderr)
        spec = parse_spec(search_spec(base, method, settings, lrs, batches, gt,
                                      args.tracking_uri))
        outcome = run_search(spec, args.tracking_uri, reporter=Progress())
        gt = gt or outcome.parent_run_id  # the first search's LDO serves the others
        table = grid(outcome, method)
        grids.append(table)
        outcomes.append(outcome)
        report += [f"{title} (search {outcome.name}, MLflow run {outcome.parent_run_id}): "
                   "mean Pearson with LDO at the last step", table.to_string(
                       float_format=lambda v: f"{v:+.3f}"), ""]
    report += findings(*grids)
    report.append(truth_quality(gt, args.tracking_uri))
    report.append(f"job {args.job}; ground truth run {gt}; total {time.time() - start:.0f} s; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared)")
    text = "\n".join(report)
    print(text)
    log_report(outcomes[0], base, text, grids, [r[0] for r in runs], args.tracking_uri)


def log_report(outcome, base: dict, text: str, grids: list[pd.DataFrame], titles: list[str],
               uri: str) -> None:
    """The report and the three heatmaps side by side, on the first search's parent run."""
    import matplotlib.pyplot as plt

    from untrac_ray.results.tracking import SearchRun
    from untrac_ray.search.plots import objective_heatmap

    spec = parse_spec({k: v for k, v in base.items() if k != "search"})
    with SearchRun(spec, uri, run_id=outcome.parent_run_id) as run:
        run.log_text(text, "sensitivity.txt")
        for title, table in zip(titles, grids, strict=True):
            name = title.lower().replace(", ", "_").replace("-", "_")
            run.log_figure(objective_heatmap(table, title, "mean Pearson with LDO"),
                           f"figures/sensitivity_{name}.png")
    plt.close("all")


if __name__ == "__main__":
    main()
