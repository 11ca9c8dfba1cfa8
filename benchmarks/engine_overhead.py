"""What the Ray engine costs over plain PyTorch, and what a second actor buys, on one machine.

The same UnTrac work (base losses of the test sets, then one unlearning task per training set,
each evaluating the test sets every few steps; a tiny random-init GPT-2, byte tokenizer) is run
three ways in one process:

1. bare: one process, ``torch.set_num_threads(1)``, one in-process ``Workbench`` running each
   task with ``bench.run(task)``;
2. engine x1: ``untrac_ray.engine.pool.Engine`` with one actor (1 CPU, 1 thread);
3. engine x2: the engine with two actors (1 CPU, 1 thread each).

What is timed (wall clock, ``time.perf_counter``):

- Ray start-up, ``ray.init(num_cpus=2, include_dashboard=False)``, is timed once and apart; it is
  in none of the three figures below.
- bare: from building the tokenized sets and the ``Workbench`` (model build from the shared
  weights) to the last unlearning task's result.
- engine: from the ``Engine`` constructor (objects put into the object store, actor processes
  started, each importing torch/transformers and building its model: the actors' start-up) to
  the last result of ``engine.map(unlearn_tasks)``, after ``engine.map(base_eval_tasks)``. The
  driver waits for all actors to be ready before the first ``map`` so that start-up can be shown
  on its own line; actor shutdown (``ray.kill``, which returns at once) is not included.

Targets (each printed with PASS/MISS):

- engine x1 / bare <= 1.10 (the engine's overhead on the identical work, start-up included);
- engine x1 / engine x2 >= 1.6 (speed-up from a second actor on 2 cores).

The losses from the three runs must agree (max abs difference printed; > 1e-5 is a bug).

Before each timed run the script waits until Ray shows every CPU free plus ``--settle`` seconds
(untimed), so that one engine's teardown does not land in the next run's figures.

It also prints how many cores the whole machine kept busy during each run and in the idle pause
before it, and warns when other processes were using the CPUs: the figures then mean little.
The exit status is 1 only when the losses disagree; a MISS is a finding, not a failure.

Run: ``.venv/bin/python benchmarks/engine_overhead.py`` (about 4 minutes on a quiet 2-core
machine: tasks of about 4.5 s, median of 2 interleaved repeats, which is their mean) or
``--quick`` (about a minute: tasks of about 1.2 s, one run each). See ``--help`` for the knobs.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine_load.py
from machine_load import busy_cores, machine_cpu, others_load  # noqa: E402

from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
from untrac_ray.engine.pool import Engine
from untrac_ray.inputs.loading import parse_spec
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import ResourcesSpec
from untrac_ray.methods.plans import plan_unlearning
from untrac_ray.methods.tasks import BASE, EvalTask, TaskResult, UnlearnTask
from untrac_ray.methods.workbench import Workbench
from untrac_ray.run.job_setup import PreparedData, eval_sample, prepare_data

OVERHEAD_TARGET = 1.10
SPEEDUP_TARGET = 1.6
TOLERANCE = 1e-5
BACKGROUND_WARNING = 0.2  # CPU cores busy while this script idles: other work skews the figures

# Eight arithmetic-like training groups and two test groups: (prompt, target) from a row number.
TRAIN_GROUPS: dict[str, Callable[[int], tuple[str, str]]] = {
    "add": lambda i: (f"What is {i % 97} plus {(7 * i) % 89}?", str(i % 97 + (7 * i) % 89)),
    "subtract": lambda i: (f"What is {100 + i} minus {i % 37}?", str(100 + i - i % 37)),
    "multiply": lambda i: (f"What is {i % 23} times {(3 * i) % 19}?", str((i % 23) * (3 * i % 19))),
    "successor": lambda i: (f"Which number comes right after {i}?", str(i + 1)),
    "predecessor": lambda i: (f"Which number comes right before {i + 1}?", str(i)),
    "double": lambda i: (f"Double the number {i}, please.", str(2 * i)),
    "half": lambda i: (f"Half of the number {2 * i} is what?", str(i)),
    "square": lambda i: (f"What is the square of {i % 50}?", str((i % 50) ** 2)),
}
TEST_GROUPS: dict[str, Callable[[int], tuple[str, str]]] = {
    "next_number": lambda i: (f"What is the number that comes after {500 + i}?", str(501 + i)),
    "sum_plus_one": lambda i: (f"What is {i} plus {i % 11} plus one?", str(i + i % 11 + 1)),
}


@dataclass
class Workload:
    """Everything the three runs share: the data, the base weights and the tasks."""

    spec: JobSpec
    data: PreparedData
    weights: SharedWeights
    base_tasks: list[EvalTask]
    tasks: list[UnlearnTask]
    indices: dict[str, np.ndarray]


@dataclass
class Timing:
    """One timed run: phases in seconds, the results, and the summed in-task compute time."""

    mode: str
    startup: float
    base_eval: float
    unlearn: float
    results: list[TaskResult]
    busy_cores: float | None = None  # the whole machine's, during the run
    background_cores: float | None = None  # the whole machine's, in the idle pause before it

    @property
    def total(self) -> float:
        return self.startup + self.base_eval + self.unlearn

    @property
    def task_seconds(self) -> float:
        return sum(r.seconds for r in self.results)


def write_data(folder: Path, n_train: int, rows: int, n_test: int, test_rows: int) -> None:
    """data.csv with prompt,target,dataset rows: n_train training groups, n_test test groups."""
    if n_train > len(TRAIN_GROUPS) or n_test > len(TEST_GROUPS):
        raise SystemExit(f"at most {len(TRAIN_GROUPS)} training and {len(TEST_GROUPS)} test sets")
    groups = [(name, make, rows) for name, make in list(TRAIN_GROUPS.items())[:n_train]]
    groups += [(name, make, test_rows) for name, make in list(TEST_GROUPS.items())[:n_test]]
    with (folder / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "target", "dataset"])
        for name, make, n in groups:
            for i in range(n):
                writer.writerow([*make(i), name])


def make_workload(folder: Path, args: argparse.Namespace) -> Workload:
    """Write the data, build the spec, tokenize, make a random-init model and plan the tasks."""
    write_data(folder, args.tasks, args.rows, args.test_sets, args.eval_examples)

    def dataset(name: str) -> dict[str, str]:
        return {"name": name, "source": "data.csv", "subset": name}

    raw: dict[str, Any] = {
        "name": "engine-overhead",
        "model": {"config": {
            "model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 128,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }},
        "tokenizer": {"kind": "byte", "max_length": 128},
        "data": {
            "train": [dataset(n) for n in list(TRAIN_GROUPS)[: args.tasks]],
            "test": [dataset(n) for n in list(TEST_GROUPS)[: args.test_sets]],
        },
        "methods": {"untrac": {
            "optimizer": "adam", "learning_rate": 1e-4, "batch_size": 8,
            "epochs": args.epochs, "eval_every": args.eval_every,
        }},
        "evaluation": {"batch_size": 64, "max_examples": args.eval_examples},
        "resources": {"num_actors": 1, "cpus_per_actor": 1},
        "cache_dir": str(folder / "cache"),
    }
    spec = parse_spec(raw, origin="benchmark", base_dir=folder)
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    weights = SharedWeights.from_model(build_model(config, seed=0))
    tasks = plan_unlearning(spec, "untrac", data.train, data.test).tasks
    return Workload(
        spec=spec,
        data=data,
        weights=weights,
        base_tasks=[EvalTask((n,)) for n in data.test],  # UnTrac's base losses: the test sets
        tasks=[t for t in tasks if isinstance(t, UnlearnTask)],
        indices=eval_sample(spec, data),
    )


def run_bare(work: Workload) -> Timing:
    """The identical work in this process: one Workbench, one thread, tasks one after another."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    datasets = {n: work.data.tokenized(n) for n in work.data.sets}
    bench = Workbench(
        {BASE: work.weights}, datasets, work.indices, work.spec.evaluation.batch_size
    )
    ready = time.perf_counter()
    base = [bench.run(t) for t in work.base_tasks]
    based = time.perf_counter()
    results = [bench.run(t) for t in work.tasks]
    done = time.perf_counter()
    return Timing("bare", ready - start, based - ready, done - based, base + results)




def settle(seconds: float, timeout: float = 30.0) -> float | None:
    """Wait until Ray shows every CPU free, then `seconds` more, before the next timed run;
    returns the cores the machine kept busy meanwhile (other processes' load: ours is idle).

    Killed actors release their CPUs asynchronously, and Ray then boots fresh idle workers;
    without the pause that start-up work lands in the next run's timing.
    """
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    return others_load(seconds)


def run_engine(work: Workload, actors: int) -> Timing:
    """The work on an Engine of `actors` one-CPU actors, start-up included (see module doc)."""
    resources = ResourcesSpec(num_actors=actors, cpus_per_actor=1)
    data = work.data
    start = time.perf_counter()
    with Engine(
        resources, {BASE: work.weights}, data.sets, data.tokenizer.pad_token_id,
        work.indices, work.spec.evaluation.batch_size, max_useful_actors=len(work.tasks),
    ) as engine:
        if engine.size != actors:
            raise RuntimeError(f"asked for {actors} actors, the engine started {engine.size}")
        engine.wait_ready()
        ready = time.perf_counter()
        base = engine.map(work.base_tasks)
        based = time.perf_counter()
        results = engine.map(work.tasks)
        done = time.perf_counter()
    return Timing(f"engine x{actors}", ready - start, based - ready, done - based, base + results)


def flat_losses(timing: Timing) -> dict[tuple[str, int, str], float]:
    """(task, step, dataset) -> loss for every loss a run measured."""
    out: dict[tuple[str, int, str], float] = {}
    for result in timing.results:
        task = result.task
        key = task.forget if isinstance(task, UnlearnTask) else "base:" + ",".join(task.datasets)
        for step, losses in result.losses.items():
            for name, value in losses.items():
                out[(key, step, name)] = value
    return out


def max_abs_diff(a: Timing, b: Timing) -> float:
    """Largest loss difference between two runs (inf when they measured different cells or a
    loss is not finite)."""
    la, lb = flat_losses(a), flat_losses(b)
    if la.keys() != lb.keys():
        return float("inf")
    diff = np.abs(np.array([la[k] for k in la]) - np.array([lb[k] for k in la]))
    return float(np.nan_to_num(diff, nan=np.inf).max())


def cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (about a minute): fewer rows, one repeat")
    parser.add_argument("--tasks", type=int, default=8,
                        help="training sets, one unlearning task each (max 8)")
    parser.add_argument("--test-sets", type=int, default=2, help="test sets (1 or 2)")
    parser.add_argument("--rows", type=int, help="rows per training set (default 128, quick 64)")
    parser.add_argument("--epochs", type=int,
                        help="unlearning epochs per task (default 4, quick 2); steps = "
                             "epochs * rows / 8")
    parser.add_argument("--eval-every", type=int, default=4,
                        help="evaluate the test sets every N unlearning steps")
    parser.add_argument("--eval-examples", type=int, default=128,
                        help="rows per test set, all evaluated")
    parser.add_argument("--repeats", type=int,
                        help="interleaved repeats of the three runs, median reported "
                             "(default 2, quick 1)")
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus given to ray.init")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of idle Ray before each timed run (not timed)")
    args = parser.parse_args(argv)
    defaults = (64, 2, 1) if args.quick else (128, 4, 2)
    for name, value in zip(("rows", "epochs", "repeats"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def describe_work(work: Workload, args: argparse.Namespace) -> str:
    settings = work.spec.methods.untrac
    assert settings is not None
    n_rows = work.data.n_rows[work.tasks[0].forget]
    evals = len(set(work.tasks[0].schedule))
    n_params = sum(a.size for a in work.weights.arrays.values())
    return (f"work: {len(work.base_tasks)} base-eval tasks + {len(work.tasks)} unlearning tasks; "
            f"each unlearns {n_rows} rows for {settings.total_steps(n_rows)} steps (batch 8) and "
            f"evaluates {len(work.base_tasks)} test set(s) x {args.eval_examples} rows {evals} "
            f"times; model gpt2 2x128 ({n_params / 1e6:.2f}M params), 1 thread per worker")


def measure(work: Workload, repeats: int, settle_seconds: float) -> dict[str, list[Timing]]:
    """Run bare, engine x1 and engine x2 `repeats` times, interleaved; Ray must be running."""
    runs: dict[str, list[Timing]] = {"bare": [], "engine x1": [], "engine x2": []}
    runners: list[Callable[[Workload], Timing]] = [
        run_bare, partial(run_engine, actors=1), partial(run_engine, actors=2),
    ]
    for repeat in range(repeats):
        for runner in runners:
            background = settle(settle_seconds)
            before = machine_cpu()
            timing = runner(work)
            timing.busy_cores = busy_cores(before, machine_cpu())
            timing.background_cores = background
            runs[timing.mode].append(timing)
            print(f"  repeat {repeat + 1}/{repeats} {timing.mode:>9}: {timing.total:6.2f} s "
                  f"(start-up {timing.startup:.2f}, base-eval {timing.base_eval:.2f}, unlearn "
                  f"{timing.unlearn:.2f}; in-task {timing.task_seconds:.2f}; machine "
                  f"{cores(timing.busy_cores)} cores busy, {cores(background)} in the idle "
                  "pause before)", flush=True)
    return runs


def report(runs: dict[str, list[Timing]], repeats: int) -> None:
    """Print the table of median phase times and the two ratios against their targets."""
    backgrounds = [t.background_cores for ts in runs.values() for t in ts
                   if t.background_cores is not None]
    if backgrounds and max(backgrounds) > BACKGROUND_WARNING:
        print(f"warning: other processes kept up to {max(backgrounds):.2f} cores busy while this "
              "script was idle; the figures are skewed, the engine's most (Ray runs its workers "
              "at nice 15, the bare loop runs at nice 0). Rerun on a quiet machine.")
    how = f"median of {repeats} interleaved repeats" if repeats > 1 else "one run each"
    print(f"\nwall times, {how}, seconds")
    print("  start-up = bare: tokenized sets + Workbench build; engine: Engine constructor "
          "(ray.put of weights and data, actor processes started, torch and transformers "
          "imported, model built) until every actor is ready")
    print("  base-eval = map of the base-loss tasks; unlearn = map of the unlearning tasks; "
          "total = start-up + base-eval + unlearn (not included: ray.init, actor shutdown)")
    print("  in-task = sum of the tasks' own run times (Workbench.run), over all workers")
    print(f"  {'run':<10}{'total':>8}{'start-up':>10}{'base-eval':>11}{'unlearn':>9}"
          f"{'in-task':>9}")

    def med(mode: str, field: str) -> float:
        return statistics.median(getattr(t, field) for t in runs[mode])

    for mode in runs:
        print(f"  {mode:<10}{med(mode, 'total'):8.2f}{med(mode, 'startup'):10.2f}"
              f"{med(mode, 'base_eval'):11.2f}{med(mode, 'unlearn'):9.2f}"
              f"{med(mode, 'task_seconds'):9.2f}")

    def without_startup(mode: str) -> float:
        return med(mode, "total") - med(mode, "startup")

    overhead = med("engine x1", "total") / med("bare", "total")
    speedup = med("engine x1", "total") / med("engine x2", "total")
    print(f"\nengine x1 / bare        = {overhead:.3f}x  (target <= {OVERHEAD_TARGET:.2f}x)  "
          f"{verdict(overhead <= OVERHEAD_TARGET)}")
    print(f"engine x1 / engine x2   = {speedup:.3f}x  (target >= {SPEEDUP_TARGET:.2f}x)  "
          f"{verdict(speedup >= SPEEDUP_TARGET)}")
    print("  for reference, without start-up: engine x1 / bare = "
          f"{without_startup('engine x1') / without_startup('bare'):.3f}x, engine x1 / engine x2 "
          f"= {without_startup('engine x1') / without_startup('engine x2'):.3f}x")


def check_agreement(runs: dict[str, list[Timing]]) -> bool:
    """Print the largest loss difference of every run against the first bare run."""
    reference = runs["bare"][0]
    diffs = {f"{t.mode} #{i + 1}": max_abs_diff(reference, t)
             for ts in runs.values() for i, t in enumerate(ts) if t is not reference}
    worst = max(diffs.values())
    ok = worst <= TOLERANCE
    print(f"\nresults agree: max |loss difference| over {len(flat_losses(reference))} losses and "
          f"{len(diffs)} runs vs the first bare run = {worst:.2e} (tolerance {TOLERANCE:.0e})  "
          f"{'OK' if ok else 'MISMATCH'}")
    if not ok:
        for name, diff in diffs.items():
            print(f"  {name}: {diff:.2e}")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
          f"{os.cpu_count()} CPUs visible")
    with tempfile.TemporaryDirectory(prefix="untrac-bench-") as tmp:
        work = make_workload(Path(tmp), args)
        print(describe_work(work, args))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the actors inherit it: no downloads
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        print(f"ray.init(num_cpus={args.cpus}, include_dashboard=False): "
              f"{time.perf_counter() - start:.2f} s (not included below)")
        try:
            runs = measure(work, args.repeats, args.settle)
        finally:
            ray.shutdown()
    report(runs, args.repeats)
    return 0 if check_agreement(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
