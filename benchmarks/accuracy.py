"""How well UnTrac, UnTrac-Inv and the baselines recover the leave-dataset-out ground truth.

One job (default ``jobs/synthetic_a_full.yaml``: pretraining on a general corpus, the training
mixture, then LDO, UnTrac, UnTrac-Inv, GradDot, GradCos, TracIn and EK-FAC) is run once per seed
with ``untrac_ray.run.runner.run_job``. Per seed ``s`` the spec is overridden so that the runs are
independent draws of everything after pretraining:

- ``training.seed = s`` (the base model's batch order in the mixture stage);
- ``methods.ldo.seeds = [s + x for x in the job's ldo.seeds]`` (the first is the base model's
  own training; the ground truth is the mean over these retrainings, as the job says);
- ``methods.untrac.seed = methods.untrac_inv.seed = s`` (the unlearning batch order).

The pretraining stage is the same for every seed (it plays the role of the paper's pretrained
T5 and is trained once and cached; its time is printed apart). Each seed has its own MLflow run.

What is measured and printed:

1. The base model (after pretraining and the mixture) on every test set: mean token loss and
   exact-match accuracy of greedy decoding of the target after the prompt (also for the model
   after pretraining only, to show what the mixture adds).
2. The ground truth and its noise floor: per cell (training set, test set), the LDO influence
   of every LDO seed (loss without the set minus loss with all sets, both trained with that
   seed), its mean and its std over the seeds. SNR = spread of the mean LDO vector across the
   training sets (std over training sets, per test set, averaged over the test sets) / typical
   per-cell seed std (root mean square over the cells). ``SNR`` uses the std of one seed's
   cell, ``SNRm`` the std of the mean over the run's LDO seeds (std / sqrt(seeds)), which is the
   noise of the ground truth actually scored against.
3. Per method, over the seeds: mean, std and min..max of the mean (over test sets) Pearson and
   Spearman correlation with the ground truth, (a) at the evaluation point chosen in advance
   (the last point of the trajectory: one epoch of UnTrac, all of UnTrac-Inv's steps, as the
   paper reports; ``--fixed-point`` changes it) and (b) at the best point in hindsight (an
   upper bound: it looks
   at the ground truth), each with the SNR of that seed's ground truth beside it. Also the
   correlation against the pooled ground truth (mean over every LDO retraining of every seed),
   and the Pearson over all cells at once (every training set x test set, at the fixed point).
4. Per method: actor compute seconds (``JobOutcome.seconds_by_method``; GradDot, GradCos and
   TracIn share one set of gradient tasks and are timed together) and the ratio to LDO's, and
   the wall time of each seed's whole job. The machine is shared: timings are noisy, the load
   average is printed.

Targets (printed PASS/MISS): UnTrac and UnTrac-Inv each reach a mean Pearson >= 0.8 with the
ground truth at the fixed point (and at the best point) and beat every baseline of the same run
(in the mean over the seeds and in every seed); UnTrac's compute time is at most a tenth of
LDO's; one seed's job takes under 15 minutes.

Run: ``.venv/bin/python benchmarks/accuracy.py --job jobs/synthetic_a_full.yaml --seeds 1 2 3``
(``--quick``: one LDO seed per run, two seeds, for a smoke test).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from untrac_ray.compute.evaluation import mean_loss, sample_indices
from untrac_ray.compute.modeling import load_model
from untrac_ray.compute.training import pretrained_dir, read_train_record, trained_model_dir
from untrac_ray.inputs.data import load_dataset_rows
from untrac_ray.inputs.fingerprints import pretrain_key
from untrac_ray.inputs.loading import apply_overrides, load_spec, parse_spec
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import GroundTruthSpec
from untrac_ray.inputs.tokenization import SEPARATOR, load_tokenizer
from untrac_ray.results.scores import ESTIMATE, score_frame
from untrac_ray.results.scoring import ALL_CELLS, MEAN_OVER_TESTS, ground_truth_noise
from untrac_ray.run.job_setup import prepare_data
from untrac_ray.run.runner import JobOutcome, run_job

ROOT = Path(__file__).resolve().parent.parent
PEARSON_TARGET = 0.8
COST_TARGET = 0.1
MINUTES_TARGET = 15.0
OURS = ("untrac", "untrac_inv")
BASELINES = ("graddot", "gradcos", "tracin", "ekfac")
TIME_LABEL = {"graddot": "graddot+gradcos+tracin", "gradcos": "graddot+gradcos+tracin",
              "tracin": "graddot+gradcos+tracin"}


# --- exact match ----------------------------------------------------------------------------

@torch.no_grad()
def greedy_exact_match(model: torch.nn.Module, tokenizer, prompts: list[str],
                       targets: list[str], max_new_tokens: int = 24,
                       batch_size: int = 128) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy decoding: ``<bos> prompt \\n`` as in training, then the
    argmax token until ``<eos>`` (or max_new_tokens); the decoded text must equal the target.

    Rows are grouped by prompt length so that no padding is needed (no position-id subtleties).
    Returns the accuracy and the decoded answers (in the order of `prompts`).
    """
    model.eval()
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    encoded = [[bos, *ids] for ids in
               tokenizer([p + SEPARATOR for p in prompts], add_special_tokens=False)["input_ids"]]
    answers: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk])
            done = torch.zeros(len(chunk), dtype=torch.bool)
            out: list[list[int]] = [[] for _ in chunk]
            for _ in range(max_new_tokens):
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
                for r, tok in enumerate(nxt.tolist()):
                    if not done[r]:
                        if tok == eos:
                            done[r] = True
                        else:
                            out[r].append(tok)
                if bool(done.all()):
                    break
                ids = torch.cat([ids, nxt[:, None]], dim=1)
            for r, i in enumerate(chunk):
                answers[i] = tokenizer.decode(out[r], skip_special_tokens=True)
    correct = [a.strip() == str(t).strip() for a, t in zip(answers, targets, strict=True)]
    return float(np.mean(correct)), answers


def copied_from_prompt(answer: str, prompt: str, target: str) -> bool:
    """A wrong answer that repeats a word or number of the prompt verbatim (e.g. "512" for
    "What is the number that comes after 512?"): the echo failure of a small model."""
    answer = answer.strip()
    return bool(answer) and answer != target.strip() and re.search(
        rf"(?<!\w){re.escape(answer)}(?!\w)", prompt) is not None


def test_accuracy(spec: JobSpec, model_dir: Path) -> dict[str, tuple[float, float]]:
    """Per test set of the spec, for the model in `model_dir`: exact-match accuracy of greedy
    decoding and the fraction of answers copied from the prompt (see copied_from_prompt)."""
    tokenizer = load_tokenizer(spec.tokenizer, str(model_dir))
    model = load_model(str(model_dir))
    out = {}
    for ds in spec.data.test:
        if ds.kind == "text":  # no prompt/target rows to decode: no exact match (NaN)
            out[ds.name] = (float("nan"), float("nan"))
            continue
        rows = load_dataset_rows(ds)
        prompts = [str(p) for p in rows.column(ds.prompt_column).to_pylist()]
        targets = [str(t) for t in rows.column(ds.target_column).to_pylist()]
        keep = sample_indices(len(prompts), spec.evaluation.max_examples, spec.evaluation.seed)
        prompts, targets = [prompts[i] for i in keep], [targets[i] for i in keep]
        acc, answers = greedy_exact_match(model, tokenizer, prompts, targets)
        copied = np.mean([copied_from_prompt(a, p, t)
                          for a, p, t in zip(answers, prompts, targets, strict=True)])
        out[ds.name] = (acc, float(copied))
    return out


def model_test_losses(spec: JobSpec, model_dir: Path) -> dict[str, float]:
    """Mean token loss of a model folder on each test set (the job's evaluation sample)."""

    data = prepare_data(spec)
    model = load_model(str(model_dir))
    ev = spec.evaluation
    out = {}
    for name in data.test:
        ts = data.tokenized(name)
        idx = sample_indices(len(ts), ev.max_examples, ev.seed)
        out[name] = mean_loss(model, ts, idx, ev.batch_size)
    return out


# --- one seed ---------------------------------------------------------------------------------

@dataclass
class SeedResult:
    seed: int
    outcome: JobOutcome
    wall_seconds: float
    pretrain_seconds: float
    base_seconds: float
    accuracy: dict[str, tuple[float, float]]
    ldo_seeds: pd.DataFrame = field(default_factory=pd.DataFrame)


def share_pretraining(spec: JobSpec) -> None:
    """Reuse a pretrained model cached under another job's name with the same pretraining key
    (same model config, tokenizer, pretraining data and settings), by a symbolic link: the
    cache folder is named after the job, the key alone decides what it holds."""
    if spec.pretraining is None:
        return
    folder = pretrained_dir(spec)
    if folder.exists():
        return
    for other in sorted(folder.parent.glob(f"*-{pretrain_key(spec)}")):
        if (other / "untrac_train.json").is_file():
            folder.symlink_to(other.resolve(), target_is_directory=True)
            print(f"reusing the pretrained model {other}", file=sys.stderr)
            return


def seeded_spec(spec: JobSpec, seed: int, ldo_seeds: int | None) -> JobSpec:
    """The job with everything after pretraining drawn with `seed` (see the module docstring)."""
    spec = spec.model_copy(deep=True)
    spec.training.seed = seed
    m = spec.methods
    if m.ldo is not None:
        offsets = m.ldo.seeds or [0]
        if ldo_seeds is not None:
            offsets = [100 * i for i in range(ldo_seeds)] if ldo_seeds > len(offsets) \
                else offsets[:ldo_seeds]
        m.ldo.seeds = [seed + x for x in offsets]
    for method in OURS:
        settings = getattr(m, method)
        if settings is not None:
            settings.seed = seed
    return spec


def earlier_ldo_run(spec: JobSpec, reuse_uri: str) -> str:
    """The newest finished run in `reuse_uri` of the same job that computed `ldo` on the same
    base model (same cached model folder, so same data, training settings and seed) with the
    same LDO seeds; exits naming what is missing."""
    from untrac_ray.results.runs import list_runs

    query = (f"tags.`untrac_ray.job` = '{spec.name}' and attributes.status = 'FINISHED' "
             f"and params.`training.seed` = '{spec.training.seed}' "
             f"and params.`methods.ldo.seeds` = '{spec.methods.ldo.seeds}'")
    for record in list_runs(reuse_uri, filter_string=query, limit=100):
        if ("ldo" in record.methods
                and record.tags.get("untrac_ray.model_dir") == str(trained_model_dir(spec))):
            return record.run_id
    raise SystemExit(f"--reuse-ldo {reuse_uri}: no finished run of job {spec.name!r} with ldo "
                     f"seeds {spec.methods.ldo.seeds} on the base model of training seed "
                     f"{spec.training.seed}")


def run_seed(spec: JobSpec, seed: int, uri: str, ldo_seeds: int | None,
             reuse_uri: str | None = None) -> SeedResult:
    s = seeded_spec(spec, seed, ldo_seeds)
    truth_run = None
    if reuse_uri and s.methods.ldo is not None:
        truth_run = earlier_ldo_run(s, reuse_uri)
        print(f"seed {seed}: ground truth from run {truth_run}", file=sys.stderr)
        s.methods.ldo = None
        s.ground_truth = GroundTruthSpec(run_id=truth_run, tracking_uri=reuse_uri)
    pre_cached = s.pretraining is None or (pretrained_dir(s) / "untrac_train.json").is_file()
    start = time.perf_counter()
    outcome = run_job(s, uri)
    wall = time.perf_counter() - start
    pre_seconds = 0.0
    if s.pretraining is not None:
        rec = read_train_record(pretrained_dir(s))
        pre_seconds = 0.0 if pre_cached else float(rec.get("seconds", 0.0))
    base_seconds = float(read_train_record(outcome.model_dir).get("seconds", 0.0))
    acc = test_accuracy(s, outcome.model_dir)
    if truth_run is not None:
        from untrac_ray.results.runs import read_run_table

        ldo = read_run_table(truth_run, reuse_uri, "ldo_seeds")
    else:
        ldo = pd.DataFrame(outcome.extras.get("ldo_seeds", []))
    if not ldo.empty:
        ldo["influence"] = ldo["loss_without"] - ldo["loss_full"]
        ldo["run_seed"] = seed
    return SeedResult(seed, outcome, wall, pre_seconds, base_seconds, acc, ldo)


# --- scoring and noise ------------------------------------------------------------------------

def truth_from(ldo: pd.DataFrame) -> pd.DataFrame:
    """Mean LDO influence per cell (train x test) over the given per-seed rows."""
    return ldo.pivot_table(index="train_set", columns="test_set", values="influence",
                           aggfunc="mean")


def score_seed(r: SeedResult, pooled: pd.DataFrame, choice: dict[str, int],
               groups: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per method: mean Pearson/Spearman (over test sets, a test set's subsets
    averaged first: `groups`) at the fixed point (the last, or `choice[method]`) and at the
    best point (hindsight), against the run's own and the pooled truth; and the Pearson over
    all cells pooled (every training set x test set at once) at the fixed point."""

    train, test = list(r.ldo_seeds["train_set"].unique()), list(r.ldo_seeds["test_set"]
                                                                 .unique())

    def mean_scores(truth: pd.DataFrame, row: str = MEAN_OVER_TESTS) -> pd.DataFrame:
        frame = score_frame(r.outcome.table, train, test, groups=groups,
                            truth=truth.reindex(index=train, columns=test), intervals=False)
        frame = frame[(frame["test_set"] == row) & (frame["kind"] == ESTIMATE)]
        return frame.set_index(["method", "point", "score"])["value"].unstack("score")

    own, vs_pooled = mean_scores(truth_from(r.ldo_seeds)), mean_scores(pooled)
    all_cells = mean_scores(truth_from(r.ldo_seeds), ALL_CELLS)
    rows = []
    for method, part in own.groupby(level="method", sort=False):
        point = (method, choice.get(method, int(part.index.get_level_values("point").max())))
        valid = part.dropna(subset=["pearson"])
        best = valid["pearson"].idxmax() if not valid.empty else point
        rows.append({"seed": r.seed, "method": method, "point": point[1],
                     "pearson": own.loc[point, "pearson"],
                     "spearman": own.loc[point, "spearman"],
                     "pearson_pooled": vs_pooled.loc[point, "pearson"],
                     "pearson_all_cells": all_cells.loc[point, "pearson"], "best_point": best[1],
                     "pearson_best": own.loc[best, "pearson"],
                     "spearman_best": own.loc[best, "spearman"]})
    return pd.DataFrame(rows)


# --- printing ---------------------------------------------------------------------------------

def fmt_spread(values: pd.Series) -> str:
    v = values.to_numpy(dtype=float)
    if len(v) == 1:
        return f"{v[0]:+.2f}"
    mean, std = np.nanmean(v), np.nanstd(v, ddof=1)
    return f"{mean:+.2f}±{std:.2f} [{np.nanmin(v):+.2f}..{np.nanmax(v):+.2f}]"


def print_report(spec: JobSpec, results: list[SeedResult], choice: dict[str, int],
                 pre_acc: dict[str, tuple[float, float]], pre_loss: dict[str, float]) -> None:
    test = [d.name for d in spec.data.test]
    train = [d.name for d in spec.data.train]
    print(f"\n=== {spec.name}: {len(results)} seeds {[r.seed for r in results]}, "
          f"{len(train)} training sets x {len(test)} test sets ===")
    n_params = read_train_record(results[0].outcome.model_dir).get("parameters")
    print(f"model: {spec.model.config.get('model_type')} {n_params} parameters; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(shared machine: timings are noisy)")

    print("\n-- base model on the test sets: loss / acc / copied (loss = mean token CE of the "
          "target; acc = exact match, greedy; copied = wrong answers that repeat words of the "
          "prompt) --")

    def cell(loss: float, acc: tuple[float, float]) -> str:
        return f" {f'{loss:.3f} / {acc[0]:.1%} / {acc[1]:.1%}':>26}"

    print(f"{'model':<22}" + "".join(f" {t:>26}" for t in test))
    if pre_loss:
        print(f"{'pretrained only':<22}" + "".join(cell(pre_loss[t], pre_acc[t]) for t in test))
    for r in results:
        print(f"{f'base, seed {r.seed}':<22}"
              + "".join(cell(r.outcome.base_losses[t], r.accuracy[t]) for t in test))

    print("\n-- ground truth: LDO influence per cell (mean over the run's LDO seeds; ± std over "
          "them) --")
    for r in results:
        ldo = r.ldo_seeds
        n = ground_truth_noise(ldo)
        print(f"seed {r.seed} (LDO seeds {sorted(ldo['seed'].unique().tolist())}): signal "
              f"{n['signal']:.4f}, per-cell seed std {n['cell_std']:.4f}, SNR {n['snr']:.2f}, "
              f"SNRm {n['snr_mean']:.2f}")
        stats = ldo.groupby(["train_set", "test_set"])["influence"].agg(["mean", "std"])
        for t in test:
            cells = "  ".join(f"{k}={stats.loc[(k, t), 'mean']:+.4f}±{stats.loc[(k, t), 'std']:.4f}"
                              for k in train)
            print(f"    {t}: {cells}")
    everything = pd.concat([r.ldo_seeds for r in results])
    pooled = ground_truth_noise(everything)
    stats = everything.groupby(["train_set", "test_set"])["influence"].agg(["mean", "std"])
    print(f"pooled over all {pooled['n']} LDO seeds: signal {pooled['signal']:.4f}, per-cell "
          f"seed std {pooled['cell_std']:.4f}, SNR {pooled['snr']:.2f}, SNRm "
          f"{pooled['snr_mean']:.2f}")
    for t in test:
        cells = "  ".join(f"{k}={stats.loc[(k, t), 'mean']:+.4f}±{stats.loc[(k, t), 'std']:.4f}"
                          for k in train)
        print(f"    {t}: {cells}")
    full_std = everything.groupby("test_set")["loss_full"].std(ddof=1)
    print("    std over seeds of the full model's test loss: "
          + ", ".join(f"{t} {full_std[t]:.4f}" for t in test))

    pooled_truth = truth_from(everything)
    scores = pd.concat([score_seed(r, pooled_truth, choice, spec.data.test_groups())
                        for r in results])
    snr = {r.seed: ground_truth_noise(r.ldo_seeds)["snr_mean"] for r in results}
    scores["snr"] = scores["seed"].map(snr)
    print("\n-- per seed: mean Pearson / Spearman with the run's own ground truth "
          "(SNRm of that ground truth beside) --")
    for r in results:
        part = scores[scores["seed"] == r.seed]
        cells = "  ".join(
            f"{row.method} {row.pearson:+.2f}/{row.spearman:+.2f}"
            + (f" (best {row.pearson_best:+.2f}@{row.best_point})" if row.method in OURS
               else "")
            for row in part.itertuples())
        print(f"seed {r.seed} [SNRm {snr[r.seed]:.2f}]: {cells}")

    print("\n-- over the seeds: mean±std [min..max] (SNRm of the ground truths: "
          f"{fmt_spread(pd.Series(list(snr.values())))}) --")
    print(f"{'method':<11}{'point':>6}  {'Pearson (fixed point)':<28}{'Spearman (fixed)':<28}"
          f"{'Pearson (best point)':<28}{'vs pooled truth':<28}{'all cells (fixed)':<28}"
          f"{'SNRm':>6}")
    for method, part in scores.groupby("method", sort=False):
        steps = ",".join(str(s) for s in sorted(part["point"].unique()))
        print(f"{method:<11}{steps:>6}  {fmt_spread(part['pearson']):<28}"
              f"{fmt_spread(part['spearman']):<28}{fmt_spread(part['pearson_best']):<28}"
              f"{fmt_spread(part['pearson_pooled']):<28}"
              f"{fmt_spread(part['pearson_all_cells']):<28}{part['snr'].mean():6.2f}")
    print(f"(vs pooled truth: against the mean over all {pooled['n']} LDO retrainings, SNRm "
          f"{pooled['snr_mean']:.2f}. all cells: one Pearson over every training set x test "
          "set cell of the seed's run at once, not a mean over test sets)")

    print("\n-- compute time (actor seconds, summed over seeds) and ratio to LDO --")
    secs: dict[str, float] = {}
    for r in results:
        for k, v in r.outcome.seconds_by_method.items():
            secs[k] = secs.get(k, 0.0) + v
    ldo_s = secs.get("ldo", math.nan)
    if "ldo" not in secs:
        print("(ldo: the ground truth was read from earlier runs (--reuse-ldo); its time is not "
              "measured here, see those runs)")
    n_ldo = np.mean([r.ldo_seeds["seed"].nunique() for r in results])
    for label, v in secs.items():
        print(f"{label:<24} {v / len(results):8.1f} s/seed   {v / ldo_s:7.3f} x LDO "
              f"({v / (ldo_s / n_ldo):6.3f} x one LDO seed)")
    for r in results:
        print(f"seed {r.seed}: whole job {r.wall_seconds / 60:.1f} min wall (pretraining "
              f"{r.pretrain_seconds / 60:.1f} min of it, base-model training "
              f"{r.base_seconds:.0f} s)")

    print("\n-- targets --")
    mean = scores.groupby("method")[["pearson", "pearson_best"]].mean()
    base = [m for m in BASELINES if m in mean.index]
    for m in OURS:
        if m not in mean.index:
            continue
        for col, what in (("pearson", "fixed point"), ("pearson_best", "best point")):
            ok = mean.loc[m, col] >= PEARSON_TARGET
            print(f"{m} mean Pearson ({what}) {mean.loc[m, col]:+.2f} >= {PEARSON_TARGET}: "
                  f"{'PASS' if ok else 'MISS'}")
        best_base = max(base, key=lambda b: mean.loc[b, "pearson"]) if base else None
        if best_base:
            ok = mean.loc[m, "pearson"] > mean.loc[best_base, "pearson"]
            per_seed = scores.pivot_table(index="seed", columns="method", values="pearson")
            wins = int((per_seed[m].to_numpy()[:, None] > per_seed[base].to_numpy()).all(1).sum())
            print(f"{m} beats every baseline at the fixed point (best baseline {best_base} "
                  f"{mean.loc[best_base, 'pearson']:+.2f}): {'PASS' if ok else 'MISS'} in the "
                  f"mean; in {wins}/{len(results)} seeds")
    if "untrac" in secs:
        ratio = secs["untrac"] / ldo_s
        print(f"untrac time / ldo time {ratio:.3f} <= {COST_TARGET}: "
              f"{'PASS' if ratio <= COST_TARGET else 'MISS'}")
    worst = max(r.wall_seconds for r in results) / 60
    print(f"slowest seed {worst:.1f} min < {MINUTES_TARGET:.0f} min: "
          f"{'PASS' if worst < MINUTES_TARGET else 'MISS'} (pretraining included in the first "
          "seed only when it was not cached)")


def with_settings(spec: JobSpec, items: list[str]) -> JobSpec:
    """The job with ``KEY.PATH=VALUE`` overrides (VALUE read as YAML), validated again, e.g.
    ``methods.untrac.learning_rate=3e-5``: the CLI's --set (loading.apply_overrides); an
    unknown key is an error naming it."""
    raw = apply_overrides(spec.model_dump(mode="json"), items)
    return parse_spec(raw, origin=f"{spec.name} with --set")


def parse_choice(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        method, _, point = item.partition("=")
        out[method] = int(point)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, default=ROOT / "jobs" / "synthetic_a_full.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ldo-seeds", type=int, default=None,
                        help="LDO retrainings per run (default: as many as the job lists)")
    parser.add_argument("--fixed-point", nargs="*", default=[], metavar="METHOD=POINT",
                        help="the evaluation point scored per method (default: each method's "
                        "last point)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY.PATH=VALUE",
                        help="override job settings, e.g. methods.untrac.learning_rate=3e-5")
    parser.add_argument("--reuse-ldo", metavar="TRACKING_URI", default=None,
                        help="take each seed's ground truth from an earlier run of this "
                        "benchmark in that store (same job, base model and LDO seeds) instead "
                        "of retraining: only the estimates are computed again")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: seeds 1 and 2, one LDO retraining per run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this (driver) process: pretraining, base-model "
                        "training, decoding (the actors use resources.cpus_per_actor each)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: a SQLite file in a temporary folder)")
    args = parser.parse_args(argv)
    seeds, ldo_seeds = args.seeds, args.ldo_seeds
    if args.quick:
        seeds, ldo_seeds = seeds[:2], 1
    spec = with_settings(load_spec(args.job), args.set)
    uri = args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='accuracy-')}/mlflow.db"
    torch.set_num_threads(args.threads)
    share_pretraining(spec)
    results = []
    for seed in seeds:
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: running {spec.name} ...",
              file=sys.stderr, flush=True)
        results.append(run_seed(spec, seed, uri, ldo_seeds, args.reuse_ldo))
        r = results[-1]
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {r.wall_seconds / 60:.1f} min, run "
              f"{r.outcome.run_id}", file=sys.stderr, flush=True)
    pre_acc: dict[str, tuple[float, float]] = {}
    pre_loss: dict[str, float] = {}
    if spec.pretraining is not None:
        folder = pretrained_dir(spec)
        pre_acc = test_accuracy(spec, folder)
        pre_loss = model_test_losses(spec, folder)
    print(f"job {args.job}{' with ' + ' '.join(args.set) if args.set else ''}, tracking {uri}")
    print_report(spec, results, parse_choice(args.fixed_point), pre_acc, pre_loss)


if __name__ == "__main__":
    main()
