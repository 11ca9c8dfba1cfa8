"""Whether a proxy's choice of estimate carries over to the full model (issue 33, item 3).

For each benchmark job, the same study `untrac-ray calibrate` runs (untrac_ray/calibrate/
study.py: the ground truth, LDO and the LDS, and every candidate on one draw) is run twice:

- on the **proxy**: the job's model family shrunk by calibrate's own proxy_spec (a preset or
  ``--proxy-config``), its training sets sampled (``--sample-rows``), on the selection draw(s)
  ``--proxy-seeds``; the proxy's choice is calibrate's: the best mean LDS there;
- on the **target**: the job's own model (``--target-config`` makes it larger; by default the
  benchmark's model, about 4x the tiny proxy's parameters), on other draws ``--target-seeds``,
  with its own LDS for every candidate.

Printed per job: each candidate's LDS on the proxy and on the target (95% interval), the rank
correlation (Spearman) between the two rankings, whether the proxy's choice is within the
target's best paired interval (its LDS minus the best's, paired bootstrap, reaches 0), the
combination of the proxy's top three (the mean of their standardized cells) against the
target's best single estimate, and the seconds of the proxy study against the target's one
draw. Then over the jobs: how often the choice carried over, and the mean rank correlation.
Rows go to ``--rows`` (CSV) as each study ends, the comparisons to ``--json`` (the paired
intervals need the cells, so they are computed while the cells are at hand).

Run (hours on 2 cores):
    .venv/bin/python benchmarks/transfer.py --jobs jobs/harm_mixture.yaml \\
        jobs/text_corpora.yaml jobs/text_corpora_unequal.yaml --rows transfer.csv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from untrac_ray.calibrate.candidates import pick_candidates
from untrac_ray.calibrate.proxy import PRESETS, proxy_spec, shrink_config
from untrac_ray.calibrate.study import Draw, Unit, draw_rows, run_draw
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_methods import LdsSpec
from untrac_ray.results.score_views import headline_rows
from untrac_ray.results.scoring import spearman
from untrac_ray.run.runner import run_job

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402  (share_pretraining)

COMBO = "combination"
CHEAP = ["untrac", "untrac+stop", "untrac+kl+stop", "untrac+npo", "untrac_inv", "graddot",
         "gradcos", "tracin", "ekfac"]


def plain_unit(uri: str):
    """Each job of a draw as a plain run (a benchmark needs no parent run)."""
    def run_unit(label: str, spec) -> Unit:
        print(f"[{time.strftime('%H:%M:%S')}] {spec.name} seed {spec.training.seed}: {label}",
              file=sys.stderr, flush=True)
        return Unit.of(run_job(spec, uri))
    return run_unit


def standardized(draw: Draw, names: list[str]) -> pd.DataFrame:
    """The combination: per test set, each candidate's cells at its last point standardized
    over the training sets, averaged over `names`."""
    parts = []
    for name in names:
        rows = draw.table[draw.table["method"] == name]
        rows = rows[rows["point"] == rows["point"].max()]
        mat = rows.pivot_table(index="train_set", columns="test_set", values="influence")
        parts.append((mat - mat.mean()) / mat.std(ddof=0).replace(0, np.nan))
    mean = sum(parts) / len(parts)
    out = mean.stack().rename("influence").reset_index()
    out["method"], out["point"] = COMBO, 0
    return out


def study(spec, seeds, candidates, lds, uri, role) -> tuple[list[dict], list[Draw], float]:
    accuracy.share_pretraining(spec)
    start = time.perf_counter()
    rows, draws = [], []
    for seed in seeds:
        draw = run_draw(spec, seed, candidates, lds, plain_unit(uri), uri)
        rows += [{**r, "role": role} for r in draw_rows(draw, candidates, role)]
        draws.append(draw)
    return rows, draws, time.perf_counter() - start


def compare(job: str, proxy_rows: list[dict], target_rows: list[dict], target: list[Draw],
            proxy_seconds: float, target_seconds: float) -> dict:
    p = pd.DataFrame(proxy_rows).groupby("candidate")["lds_value"].mean()
    t = pd.DataFrame(target_rows).groupby("candidate")["lds_value"].mean()
    common = [c for c in p.index if c in t.index]
    chosen = str(p[common].idxmax())
    best = str(t[common].idxmax())
    diffs = [d.difference(chosen, best, "lds") for d in target] if chosen != best else []
    within = chosen == best or all(d[2] >= 0 for d in diffs)
    top3 = list(p[common].sort_values(ascending=False).index[:3])
    combo = []
    for d in target:
        d.table = pd.concat([d.table[d.table["method"] != COMBO], standardized(d, top3)],
                            ignore_index=True)
        top = headline_rows(d.scores())
        mine = top[(top["method"] == COMBO) & (top["score"] == "lds")]
        combo.append((float(mine["value"].mean()), *d.difference(COMBO, best, "lds")))
    return {"job": job, "chosen": chosen, "target_best": best,
            "spearman": spearman(p[common].to_numpy(), t[common].to_numpy()),
            "within": within,
            "chosen_minus_best": float(np.mean([x[0] for x in diffs])) if diffs else 0.0,
            "chosen_minus_best_low": float(np.mean([x[1] for x in diffs])) if diffs else 0.0,
            "chosen_minus_best_high": float(np.mean([x[2] for x in diffs])) if diffs else 0.0,
            "combination": top3, "combination_lds": float(np.mean([c[0] for c in combo])),
            "combination_minus_best": float(np.mean([c[1] for c in combo])),
            "combination_low": float(np.mean([c[2] for c in combo])),
            "combination_high": float(np.mean([c[3] for c in combo])),
            "proxy_seconds": proxy_seconds, "target_seconds": target_seconds,
            "proxy": {c: float(p[c]) for c in common}, "target": {c: float(t[c]) for c in common}}


def report(results: list[dict], rows: pd.DataFrame) -> None:
    for r in results:
        print(f"\n=== {r['job']}: proxy {r['proxy_seconds']:.0f} s, one target draw "
              f"{r['target_seconds']:.0f} s ===")
        print(f"{'estimate':<20}{'proxy LDS':>10}{'target LDS':>12}  target interval")
        part = rows[(rows["job"] == r["job"]) & (rows["role"] == "target")]
        for c in sorted(r["proxy"], key=lambda c: -r["proxy"][c]):
            t = part[part["candidate"] == c]
            span = f"[{t['lds_low'].mean():+.2f}, {t['lds_high'].mean():+.2f}]"
            mark = " <- proxy's choice" if c == r["chosen"] else (
                " <- target's best" if c == r["target_best"] else "")
            print(f"{c:<20}{r['proxy'][c]:+10.2f}{r['target'][c]:+12.2f}  {span}{mark}")
        print(f"rank correlation (Spearman) proxy vs target: {r['spearman']:+.2f}; the choice "
              f"{r['chosen']} minus the target's best {r['target_best']}: "
              f"{r['chosen_minus_best']:+.2f} [{r['chosen_minus_best_low']:+.2f}, "
              f"{r['chosen_minus_best_high']:+.2f}]: "
              + ("WITHIN the best's paired interval" if r["within"] else "MISS: below it"))
        print(f"combination of {', '.join(r['combination'])}: LDS {r['combination_lds']:+.2f}, "
              f"minus the best single {r['combination_minus_best']:+.2f} "
              f"[{r['combination_low']:+.2f}, {r['combination_high']:+.2f}]")
    if results:
        carried = sum(r["within"] for r in results)
        print(f"\nover {len(results)} benchmarks: the proxy's choice within the target's best "
              f"paired interval on {carried}; mean rank correlation "
              f"{np.nanmean([r['spearman'] for r in results]):+.2f}; the combination ahead of "
              f"the best single beyond the interval on "
              f"{sum(r['combination_low'] > 0 for r in results)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=Path, nargs="+", default=[ROOT / "jobs" /
                                                                 "harm_mixture.yaml"])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--target-config", default=None,
                        help="JSON of hidden, layers, heads for the target (default: the job's)")
    parser.add_argument("--sample-rows", type=int, default=2000)
    parser.add_argument("--proxy-seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--target-seeds", type=int, nargs="+", default=[2])
    parser.add_argument("--lds-subsets", type=int, default=16)
    parser.add_argument("--lds-noise", type=int, default=2)
    parser.add_argument("--candidates", nargs="+", default=CHEAP)
    parser.add_argument("--rows", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    uri = args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='transfer-')}/mlflow.db"
    lds = LdsSpec(subsets=args.lds_subsets, noise_subsets=args.lds_noise)
    results, all_rows = [], []
    for job in args.jobs:
        spec = load_spec(job)
        candidates = pick_candidates(args.candidates, len(spec.data.test))
        target = spec
        if args.target_config:
            target = spec.model_copy(deep=True)
            target.model.config = shrink_config(spec.model.config, json.loads(args.target_config))
        proxy = proxy_spec(spec, args.preset, sample_rows=args.sample_rows)
        p_rows, _, p_secs = study(proxy, args.proxy_seeds, candidates, lds, uri, "proxy")
        t_rows, t_draws, t_secs = study(target, args.target_seeds, candidates, lds, uri,
                                        "target")
        rows = [{**r, "job": spec.name} for r in p_rows + t_rows]
        all_rows += rows
        if args.rows:
            pd.DataFrame(rows).to_csv(args.rows, mode="a", header=not args.rows.exists(),
                                      index=False)
        results.append(compare(spec.name, p_rows, t_rows, t_draws, p_secs, t_secs))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=float))
        report(results[-1:], pd.DataFrame(all_rows))
    print("\n=== all benchmarks ===")
    report(results, pd.DataFrame(all_rows))


if __name__ == "__main__":
    main()
