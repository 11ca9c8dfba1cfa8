"""What `untrac-ray calibrate` costs against the job it calibrates, at two target sizes.

The same benchmark job at two sizes of its model (``--sizes``: hidden widths; 128 and 256 at
the job's depth are 4x apart in the weights of their layers) is calibrated with the product's
own ``calibrate_job`` (the same preset, sample, candidates and seeds for both), each in a
fresh tracking store and cache so that nothing is reused, and run once as a user runs it
(``--full-methods``, default UnTrac and UnTrac-Inv with the job's settings, no ground truth;
its base model trained from scratch in its own cache). Printed per size: the calibration's
seconds, the full job's, and their ratio; then the calibration's time at the larger size
against the smaller (target: under 1.2x; the proxy of both is the same job, so only the
noise of a shared machine separates them).

Run: ``.venv/bin/python benchmarks/calibrate_cost.py --job jobs/harm_mixture.yaml``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from untrac_ray.calibrate.driver import CalibrateOptions, calibrate_job
from untrac_ray.compute.modeling import build_model, config_from_dict
from untrac_ray.inputs.loading import load_spec
from untrac_ray.run.runner import run_job

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.2


def sized(hidden: int, cache: Path) -> list[str]:
    """The --set overrides of one size: the width, its feed-forward, its own cache."""
    return [f"model.config.hidden_size={hidden}", f"model.config.intermediate_size={4 * hidden}",
            f"cache_dir={cache}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, default=ROOT / "jobs" / "harm_mixture.yaml")
    parser.add_argument("--sizes", type=int, nargs=2, default=[128, 256])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--candidates", default="untrac,untrac+stop,graddot")
    parser.add_argument("--lds-subsets", type=int, default=8)
    parser.add_argument("--lds-noise", type=int, default=0)
    parser.add_argument("--full-methods", nargs="+", default=["untrac", "untrac_inv"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="calibrate-cost-"))
    out = {}
    for hidden in args.sizes:
        where = root / f"h{hidden}"
        where.mkdir()
        overrides = sized(hidden, where / "cache")
        options = CalibrateOptions(preset=args.preset, lds_subsets=args.lds_subsets,
                                   lds_noise=args.lds_noise,
                                   candidates=args.candidates.split(","),
                                   out=where / "calibrated.yaml")
        start = time.perf_counter()
        calibrate_job(args.job, overrides, options, f"sqlite:///{where / 'cal.db'}")
        cal = time.perf_counter() - start
        spec = load_spec(args.job, [*sized(hidden, where / "full-cache")])
        for method in type(spec.methods).model_fields:
            if method not in args.full_methods:
                setattr(spec.methods, method, None)
        start = time.perf_counter()
        run_job(spec, f"sqlite:///{where / 'full.db'}")
        full = time.perf_counter() - start
        params = sum(p.numel() for p in build_model(config_from_dict(
            spec.model.config, vocab_size=260)).parameters())  # a byte-level vocabulary
        out[hidden] = {"calibrate_seconds": cal, "full_job_seconds": full, "params": params}
        print(f"hidden {hidden} ({params / 1e6:.2f}M parameters): calibrate {cal:.0f} s, one "
              f"full job ({', '.join(args.full_methods)}, base model trained) {full:.0f} s, "
              f"calibrate / full {cal / full:.2f}", flush=True)
    small, large = (out[h]["calibrate_seconds"] for h in args.sizes)
    ratio = large / small
    verdict = "PASS" if ratio < TARGET else f"MISS by {ratio - TARGET:.2f}x"
    full = [out[h]["full_job_seconds"] for h in args.sizes]
    print(f"\ncalibration at hidden {args.sizes[1]} / at {args.sizes[0]}: {ratio:.2f}x "
          f"(target < {TARGET}x): {verdict}; the full job: {full[1] / full[0]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
