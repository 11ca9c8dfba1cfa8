"""A calibration in MLflow: its parent run, the units of work nested under it, its summary.

The parent run (kind `calibration`, tagged with the calibration's key) holds a record of each
finished unit, `units/<seed>/<label>.json` (the nested run's id and actor seconds), written
when the unit's run finished, so that a calibration started again skips it and reads its cells
back from that run. A unit whose run was killed is resumed like `run --resume`; one never
started runs. The summary (`calibration.json`: the choice, its held-out score, the ranking)
is what `validate`, the verdict of a run that cites the calibration and `show` read.
"""

from __future__ import annotations

import json

import pandas as pd

from untrac_ray.inputs.errors import TrackingError
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.results.runs import (
    RunRecord,
    get_run_record,
    list_runs,
    read_run_table,
    read_run_text,
)
from untrac_ray.results.store import TAG_PREFIX, store_exists
from untrac_ray.results.tracking import PARENT_TAG, JobRun

KIND = "calibration"
SUMMARY = "calibration.json"
KEY_TAG = TAG_PREFIX + "calibration_key"


def find_calibration(uri: str, spec: JobSpec, key: str) -> RunRecord | None:
    """The newest calibration run of this proxy job with this key, finished or not; None
    when there is none. TrackingError when it is still running under a live driver."""
    if not store_exists(uri):
        return None
    job = spec.name.replace("'", "")
    found = [r for r in list_runs(uri, None, f"tags.`{TAG_PREFIX}job` = '{job}'", limit=200)
             if r.tags.get(TAG_PREFIX + "kind") == KIND and r.tags.get(KEY_TAG) == key
             and r.parent_id is None]
    if not found:
        return None
    if found[0].status == "RUNNING" and not found[0].stale:
        raise TrackingError(f"calibration run {found[0].run_id} of this job is still running "
                            f"(driver {found[0].tags.get(TAG_PREFIX + 'driver', '?')})")
    return found[0]


class CalibrationRun(JobRun):
    """The parent run of a calibration; `run_id` reopens one (a calibration started again)."""

    def __init__(self, spec: JobSpec, tracking_uri: str, key: str,
                 tags: dict[str, str] | None = None, run_id: str | None = None,
                 start_time: int | None = None) -> None:
        super().__init__(spec, tracking_uri, {TAG_PREFIX + "kind": KIND, KEY_TAG: key,
                                              **(tags or {})},
                         run_id=run_id, start_time=start_time)

    def child_tags(self, seed: int, label: str) -> dict[str, str]:
        """The tags of a unit's nested run: under this run, with its draw and candidate."""
        return {PARENT_TAG: self.run_id, TAG_PREFIX + "calibration": self.run_id,
                TAG_PREFIX + "draw": str(seed), TAG_PREFIX + "candidate": label}

    def finished_unit(self, seed: int, label: str) -> dict | None:
        """The record of a unit that finished (its run id, seconds), or None."""
        text = read_run_text(self.run_id, self.uri, _unit_file(seed, label))
        return None if text is None else json.loads(text)

    def save_unit(self, seed: int, label: str, record: dict) -> None:
        self.log_json(record, _unit_file(seed, label))


def _unit_file(seed: int, label: str) -> str:
    return f"units/{seed}/{label.replace('+', '_plus_').replace(' ', '_')}.json"


def unit_tables(run_id: str, uri: str) -> dict[str, pd.DataFrame | None]:
    """A finished unit's cells (`influence`) and, for a draw's ground-truth job, its LDS
    subsets and LDO seeds, read back from its run."""
    return {stem: read_run_table(run_id, uri, stem)
            for stem in ("influence", "lds_subsets", "ldo_seeds")}


def read_calibration(run_id: str, uri: str) -> dict:
    """A finished calibration's summary; TrackingError (one line) when the run is not a
    calibration or has not finished."""
    record = get_run_record(run_id, uri)
    if record.tags.get(TAG_PREFIX + "kind") != KIND:
        raise TrackingError(f"run {run_id} in {uri} is not a calibration (untrac-ray "
                            "calibrate makes one)")
    text = read_run_text(record.run_id, uri, SUMMARY)
    if text is None:
        raise TrackingError(f"calibration run {run_id} has no result yet ({record.status}): "
                            "run `untrac-ray calibrate` on its job again to finish it")
    return json.loads(text)


def run_calibration(run_id: str, uri: str) -> dict | None:
    """The calibration summary a run holds (a job that cites a calibration keeps a copy; a
    calibration's own run its result), None when it has none."""
    text = read_run_text(run_id, uri, SUMMARY)
    return None if text is None else json.loads(text)
