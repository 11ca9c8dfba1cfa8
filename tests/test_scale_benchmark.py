"""benchmarks/scale.py in pieces, in seconds: the RSS sampler finds a process tree's marked
processes and keeps their peaks, the throughput workload counts the tokens of the steps it
times, the bare loop runs it, and the report prints a verdict per target. The whole script on
a tiny OPT (`--smoke`: a real `untrac-ray run`, Ray, a 2-process gang) is marked slow."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import load_benchmark
from untrac_ray.compute.modeling import label_count

REPO = Path(__file__).resolve().parent.parent


scale = load_benchmark("scale")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny OPT saved as a folder, the benchmark's data and job, and its workload."""
    folder = tmp_path_factory.mktemp("scale")
    args = scale.parse_args(["--smoke"])
    model = scale.save_model(folder / "model", args)
    scale.write_data(folder)
    job = scale.write_job(folder, folder / "model", args)
    return {"args": args, "model": model, "work": scale.make_workload(job, model)}


def test_smoke_and_shape_flags():
    assert (scale.parse_args([]).layers, scale.parse_args([]).hidden) == (12, 768)
    args = scale.parse_args(["--smoke", "--layers", "3"])
    assert (args.layers, args.hidden, args.heads, args.ffn) == (3, 64, 2, 128)


def test_the_sampler_keeps_the_peaks_of_the_marked_descendants():
    """A shell (the 'driver') with a grandchild whose command line carries the actor mark and
    one without: only the marked one is an actor."""
    script = (f"(exec -a '{scale.ACTOR_MARK}' sleep 3) & (exec -a other sleep 3) & wait")
    proc = subprocess.Popen(["bash", "-c", script])
    try:
        with scale.RssSampler(proc.pid, interval=0.05) as sampler:
            time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()
    assert sampler.samples >= 5
    assert sampler.driver.rss > 0
    assert len(sampler.actors) == 1
    (actor,) = sampler.actors.values()
    assert 0 < actor.rss and actor.shared <= actor.rss


def test_the_workload_times_the_untrac_tasks_without_evaluation(tiny):
    work = tiny["work"]
    assert [t.forget for t in work.tasks] == list(scale.TRAIN_SETS)
    assert all(t.evaluate == () for t in work.tasks)
    assert work.warmup.evaluate == tuple(scale.TEST_SETS)  # the warm-up measures a loss
    # 2 steps of 8 rows per task: the labelled tokens of those rows (targets), counted again
    task = work.tasks[0]
    rows = work.data.tokenized(task.forget)
    steps = scale.batch_schedule(len(rows), 8, 2, task.settings.seed)
    assert scale.ascent_tokens(task, work.data)[0] == sum(label_count(rows.batch(s))
                                                         for s in steps)
    assert 0 < work.tokens < work.batch_tokens
    assert scale.longest_row(work.data) <= tiny["args"].max_length


def test_the_bare_loop_runs_the_tasks(tiny):
    run = scale.run_bare(tiny["work"], threads=1)
    assert run.task_seconds > 0 and run.wall_seconds >= run.task_seconds
    assert np.isfinite(run.warmup_loss)


def test_the_report_gives_a_verdict_per_target(tiny, capsys):
    terms = scale.formula(tiny["model"], tiny["work"].data)
    runtime = scale.Peak("idle actor", 400 * 10**6, 100 * 10**6)
    total = terms.total(runtime.rss)
    run = scale.RunMemory(30.0, scale.Peak("driver", rss=2 * 10**9), [
        scale.Peak("actor pid 1", rss=total), scale.Peak("actor pid 2", rss=int(1.4 * total))],
        150)
    scale.print_memory(run, runtime, terms, 46)
    out = capsys.readouterr().out
    (driver,) = [line for line in out.splitlines() if line.startswith("  driver")]
    assert "2,000 MB" in driver and driver.endswith("FAIL")
    assert "ratio 1.00  target <= 1.3  PASS" in out and "ratio 1.40  target <= 1.3  FAIL" in out
    rows = [scale.Throughput("bare", 4.0, 4.0, 1.5), scale.Throughput("engine", 5.0, 5.5, 1.5)]
    scale.print_throughput(rows, 3.0, tiny["work"])
    out = capsys.readouterr().out
    assert "  0.800 " in out  # engine / bare tokens/s


@pytest.mark.slow
def test_the_whole_benchmark_on_a_tiny_model():
    """`--smoke`: every part, each printed with its figures (about a minute or two)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--smoke"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    for heading in ("== 1. driver peak RSS", "== 2. actor peak RSS / formula",
                    "== 3-4. unlearning throughput", "== 4. parameters + Adam state"):
        assert heading in out
    assert out.count("actor pid") == 2
    assert "FSDP x2" in out and "(0.500 of one process)" in out
