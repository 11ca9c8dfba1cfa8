"""The choice of a calibration: made on the selection draws, reported on held-out ones.

`decide` picks the candidate with the best mean LDS over the selection draws (the Pearson with
LDO where no draw has an LDS), among those the user's own job can run; only then are the
held-out draws read: the choice's LDS there with its interval and its lead over the reference
rows, the best other candidate there, and the paired difference between the two with its
interval (each the mean over the held-out draws of that draw's value and bounds). The summary
it returns is what the parent run keeps (results/calibration.py), the verdict cites
(results/verdict.py calibration_line) and `write_job_file` explains in the job file it writes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from untrac_ray.calibrate.candidates import BY_NAME, Candidate
from untrac_ray.calibrate.study import Draw
from untrac_ray.results.verdict import calibration_line


def _score_of(rows: pd.DataFrame) -> str:
    return "lds" if "lds_value" in rows and rows["lds_value"].notna().any() else "pearson"


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def decide(rows: pd.DataFrame, draws: list[Draw], choosable: list[str]) -> dict[str, Any]:
    """The summary of a calibration (module docstring). `rows`: study.draw_rows of every draw
    (phase select or report); `draws`: the held-out draws, for the paired difference;
    `choosable`: the candidates the user's job can run."""
    score = _score_of(rows)
    value = f"{score}_value"
    select = rows[rows["phase"] == "select"]
    report = rows[rows["phase"] == "report"]
    by_select = select.groupby("candidate")[value].mean()
    ranked = [c for c in by_select.sort_values(ascending=False).index if c in choosable]
    if not ranked:
        raise ValueError("no candidate the job can run was scored on the selection draws")
    chosen = ranked[0]
    held = report.groupby("candidate").mean(numeric_only=True)
    mine = held.loc[chosen] if chosen in held.index else pd.Series(dtype=float)
    others = held.drop(index=chosen, errors="ignore")[value].dropna().sort_values(
        ascending=False)
    summary: dict[str, Any] = {
        "chosen": chosen, "method": BY_NAME[chosen].method, "score": score,
        "value": float(mine.get(value, math.nan)),
        "low": float(mine.get(f"{score}_low", math.nan)),
        "high": float(mine.get(f"{score}_high", math.nan)),
        "margin_low": float(mine.get(f"{score}_margin_low", math.nan)),
        "ceiling": float(mine.get(f"{score}_ceiling", math.nan)),
        "select_seeds": sorted(int(s) for s in select["seed"].unique()),
        "report_seeds": sorted(int(s) for s in report["seed"].unique()),
        "next": None, "difference": math.nan, "difference_low": math.nan,
        "difference_high": math.nan,
        "ranking": [{"candidate": c, "select": float(by_select.get(c, math.nan)),
                     "held_out": float(held[value].get(c, math.nan)) if c in held.index
                     else math.nan,
                     "held_out_low": float(held[f"{score}_low"].get(c, math.nan))
                     if c in held.index else math.nan,
                     "held_out_high": float(held[f"{score}_high"].get(c, math.nan))
                     if c in held.index else math.nan,
                     "choosable": c in choosable}
                    for c in by_select.sort_values(ascending=False).index],
    }
    if len(others):
        nxt = str(others.index[0])
        diffs = [d.difference(chosen, nxt, score) for d in draws
                 if {chosen, nxt} <= set(d.table["method"])]
        summary.update(next=nxt, difference=_mean(x[0] for x in diffs),
                       difference_low=_mean(x[1] for x in diffs),
                       difference_high=_mean(x[2] for x in diffs))
    return summary


def chosen_settings(raw_methods: dict | None, candidate: Candidate) -> dict[str, Any]:
    """The chosen method's settings for the job file: the job's own, the variant's on top."""
    own = dict((raw_methods or {}).get(candidate.method) or {})
    return {**own, **candidate.settings}


def write_job_file(job: Path, raw: dict, summary: dict, run_id: str, proxy_words: str,
                   out: Path | None = None, tracking_uri: str | None = None) -> Path:
    """The user's job (its mapping, `--set` applied) with `methods` the chosen one and
    `calibration` naming the run, beside the user's file (`<stem>.calibrated.yaml`) or at
    `out`, headed by a comment saying what was chosen and why."""
    candidate = BY_NAME[summary["chosen"]]
    job_raw = dict(raw)
    job_raw["methods"] = {candidate.method: chosen_settings(raw.get("methods"), candidate)}
    job_raw["calibration"] = {"run_id": run_id, **({"tracking_uri": tracking_uri}
                                                   if tracking_uri else {})}
    for key in ("ground_truth", "search"):
        job_raw.pop(key, None)
    path = out or job.with_name(f"{job.stem}.calibrated.yaml")
    why = calibration_line(summary)
    ranking = ", ".join(f"{r['candidate']} {r['held_out']:+.2f}" for r in summary["ranking"]
                        if r["held_out"] == r["held_out"])
    header = [f"Written by `untrac-ray calibrate {job.name}` on {time.strftime('%Y-%m-%d')}.",
              f"The proxy: {proxy_words}.",
              f"{why[0].upper()}{why[1:]}.",
              f"Chosen on draws {summary['select_seeds']}, scored on held-out draws "
              f"{summary['report_seeds']}; held-out {summary['score'].upper()} of every "
              f"candidate: {ranking}.",
              f"MLflow run {run_id}; the run of this job cites it in its verdict. The comments "
              f"of {job.name} are not kept here."]
    lines = []
    for text in header:
        words, line = text.split(), "#"
        for word in words:
            if len(line) + len(word) + 1 > 95:
                lines.append(line)
                line = "#"
            line += " " + word
        lines.append(line)
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(job_raw, sort_keys=False),
                    encoding="utf-8")
    return path
