"""What `run --resume` saves after a driver is killed, measured side by side in one run.

The demo job (jobs/synthetic_a.yaml by default; its base model is trained once first, so that
every figure below is about the tasks) is run three ways, each a real `untrac-ray run`
process on its own SQLite store in a temporary folder:

1. undisturbed: the whole job, start to end;
2. killed: the same job, SIGKILLed as soon as `--kill-after` of its tasks are stored (the
   driver dies without closing its run, as under the OOM killer or a lost node);
3. resumed: `run --resume` on the killed run: restored tasks are skipped, the others run.

Printed: each path's wall time, the tasks restored of all, the resumed run's cells against
the undisturbed run's (max abs difference; > 1e-5 is a bug), and two ratios:
killed + resumed over undisturbed (the cost of the interruption, process start-ups included)
and resumed over undisturbed (what the rerun costs; a restart from scratch would be 1.0).

    .venv/bin/python benchmarks/resume.py [--job jobs/synthetic_a.yaml] [--kill-after 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading tables back

from untrac_ray.inputs.loading import load_spec  # noqa: E402
from untrac_ray.results.runs import read_influence  # noqa: E402


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "untrac_ray.cli", *args, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1",
                                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"untrac-ray failed ({proc.returncode}):\n{err[-3000:]}")
    return out


def _stored(folder: Path) -> int:
    return len(list(folder.glob("mlartifacts/**/tasks/*.npz")))


def _only_run(uri: str) -> tuple[str, str, dict[str, str]]:
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(ids)
    return run.info.run_id, run.info.status, dict(run.data.tags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(REPO / "jobs" / "synthetic_a.yaml"))
    parser.add_argument("--kill-after", type=int, default=5, help="tasks stored before the kill")
    args = parser.parse_args()
    spec = load_spec(args.job)
    with tempfile.TemporaryDirectory(prefix="untrac-resume-") as tmp:
        folder = Path(tmp)
        job = folder / "job.yaml"  # the resolved spec: absolute data paths, its own cache
        resolved = yaml.safe_load(spec.to_yaml())
        resolved["cache_dir"] = str(folder / "cache")
        job.write_text(yaml.safe_dump(resolved, sort_keys=False))
        print(f"job {spec.name}: training its base model once (not timed)", flush=True)
        _finish(_cli("train", str(job)))

        uri_a = f"sqlite:///{folder / 'a' / 'mlflow.db'}"
        start = time.perf_counter()
        _finish(_cli("run", str(job), "--tracking-uri", uri_a))
        undisturbed = time.perf_counter() - start
        print(f"undisturbed run: {undisturbed:.1f} s", flush=True)

        uri_b = f"sqlite:///{folder / 'b' / 'mlflow.db'}"
        start = time.perf_counter()
        proc = _cli("run", str(job), "--tracking-uri", uri_b)
        while _stored(folder / "b") < args.kill_after and proc.poll() is None:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise SystemExit("the job finished before the kill: lower --kill-after")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.perf_counter() - start
        time.sleep(1.0)
        run_id, status, _ = _only_run(uri_b)
        print(f"killed after {killed:.1f} s with {_stored(folder / 'b')} tasks stored "
              f"(run {run_id[:8]} left {status})", flush=True)

        start = time.perf_counter()
        _finish(_cli("run", str(job), "--tracking-uri", uri_b, "--resume"))
        resumed = time.perf_counter() - start
        again, status, tags = _only_run(uri_b)
        total = _stored(folder / "b")
        restored = int(tags["untrac_ray.restored_tasks"])
        a = read_influence(_only_run(uri_a)[0], uri_a)
        b = read_influence(again, uri_b)
        keys = ["method", "point", "train_set", "test_set"]
        both = pd.merge(a, b, on=keys, suffixes=("_a", "_b"), validate="1:1")
        diff = float((both["influence_a"] - both["influence_b"]).abs().max())

    print()
    print(f"| path | wall s | note |\n|---|---:|---|\n"
          f"| undisturbed | {undisturbed:.1f} | {total} tasks |\n"
          f"| killed (SIGKILL) | {killed:.1f} | after {args.kill_after}+ tasks stored |\n"
          f"| resumed | {resumed:.1f} | restored {restored} of {total} tasks; same run "
          f"{'yes' if again == run_id else 'NO'}, {status} |")
    print(f"\nkilled + resumed / undisturbed = {(killed + resumed) / undisturbed:.2f}")
    print(f"resumed / undisturbed = {resumed / undisturbed:.2f} (a rerun from scratch: 1.00)")
    print(f"max |influence resumed - undisturbed| = {diff:.2e} over {len(both)} cells "
          f"({'OK' if diff <= 1e-5 else 'BUG'})")


if __name__ == "__main__":
    main()
