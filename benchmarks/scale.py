"""An OPT-125M-shaped job on this machine: what the driver and each actor hold in memory, and
what unlearning throughput the engine and a sharded gang reach, measured side by side in one run.

The model is OPT-125M's shape (12 layers, hidden 768, ffn 3072, 12 heads, dropout 0.1) with the
project's byte tokenizer (257 tokens instead of OPT's 50,272: about 85M parameters instead of
125M), random weights saved as a model folder first, so that nothing below trains a base model.
The data: four training sets of 16, 24, 32 and 20 prompt/target rows and one test set of 16
(short arithmetic rows, at most `max_length` 64 tokens). MB and GB are 10^6 and 10^9 bytes.

1. Driver memory. A real `untrac-ray run job.yaml` (a subprocess, `-q`) runs UnTrac,
   UnTrac-Inv, GradDot and GradCos on that model (unlearning: Adam, batch 8, 2 steps; gradient
   methods: batch 8; evaluation.max_examples 16; 2 actors of 1 CPU). Every 0.2 s the script
   reads the resident set size (RSS, psutil) of the driver process and of each descendant whose
   command line shows `ray::WorkbenchActor`, keeping each one's peak. RSS counts the object
   store's shared pages a process has touched (the `shared` column). Target: the driver's peak
   below 1.5 GB.
2. Actor memory against untrac_ray/compute/memory.py. Each actor's peak RSS is divided by
   `actor_memory(...).total(runtime)` for the job's settings (Adam, 8 rows of the longest row's
   tokens, fp32, one weight set, one test set). The runtime term is measured here: the RSS of
   an idle Ray actor that imported untrac_ray.engine.pool, torch and transformers.
   With --weights-dtype bf16 the job's actors keep bf16 weights (stepped with stochastic
   rounding) and the formula is taken for them. The formula's
   terms are printed in MB, and each actor's peak split into private and shared pages (the
   libraries' pages of the idle actor, the shared weights, and what else it mapped), so a
   ratio far from 1 points at the term that is off. Target: measured / formula <= 1.3 for
   every actor.
3. Engine against a bare loop. The job's four UnTrac tasks (plan_unlearning; here they evaluate
   no set, so that their time is the ascent steps and the reset) run (a) in this process on a
   Workbench with T torch threads and (b) on untrac_ray.engine.pool.Engine with one actor of
   cpus_per_actor T (the actor sets T threads). One more task first, untimed, warms each up.
   Tokens: those of the ascent steps' batches (the same seeded rows), labelled ones
   (modeling.label_count: the targets the loss is taken on) and all of them (rows x padded
   width: what the model computes); tokens/s = tokens / the tasks' own seconds
   (TaskResult.seconds, inside the actor); the map's wall time, which adds Ray's dispatch, is
   printed beside it. engine / bare near 1.0 means the engine costs nothing per step.
4. A sharded gang. The same tasks on 2 processes of one FSDP2 gang (untrac_ray/engine/sharded.py,
   gloo on the CPU, 1 torch thread each: the 2 cores split by processes instead of threads);
   tokens/s (the slower rank's task seconds) and its ratio to bare; and each rank's parameter
   and Adam-state bytes (ShardedWorkbench.local_bytes(), plus two moments per parameter)
   against one process's.

Every figure comes from one run, on a machine that may be shared: beside each throughput the
script prints how many cores the whole machine kept busy during it and in an idle pause just
before it (`--settle` seconds: other processes' load), and warns when others were busy; the
figures then mean little. The test set's loss after the warm-up task is printed for each way
(bare and engine must agree exactly). The exit status is 0 whatever the targets say (a FAIL is
a finding); non-zero when a step crashed.

    .venv/bin/python benchmarks/scale.py            # the full size: 10-15 min on 2 cores
    .venv/bin/python benchmarks/scale.py --smoke    # a tiny OPT, every part, 1-3 min
    .venv/bin/python benchmarks/scale.py --layers 6 --hidden 512 --heads 8 --ffn 2048
    .venv/bin/python benchmarks/scale.py --weights-dtype bf16   # parts 1-2 with bf16 actors

On a machine with CUDA, parts 3 and 4 run on the GPU (the gang needs 2 GPUs, else it is
skipped); parts 1 and 2 measure host memory and keep the job's actors on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import platform
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine_load.py
from machine_load import Sampling, busy_cores, machine_cpu, others_load  # noqa: E402

from untrac_ray.compute.memory import ActorMemory, actor_memory, needs_base_copy
from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict, label_count
from untrac_ray.compute.optim import batch_schedule
from untrac_ray.engine.pool import Engine
from untrac_ray.engine.ray_start import ensure_ray
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.inputs.spec_sections import ResourcesSpec
from untrac_ray.inputs.tokenization import byte_level_tokenizer
from untrac_ray.methods.plans import plan_unlearning
from untrac_ray.methods.tasks import BASE, TaskResult, UnlearnTask
from untrac_ray.methods.workbench import Workbench
from untrac_ray.run.job_setup import PreparedData, eval_sample, prepare_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the run's subprocess and the actors inherit it
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DRIVER_TARGET = 1.5e9  # bytes: the driver's peak RSS
FORMULA_TARGET = 1.3  # an actor's peak RSS / the formula
ACTOR_MARK = "ray::WorkbenchActor"
MB, GB = 1e6, 1e9
GANG = 2
GANG_TIMEOUT_S = 1200
OTHERS_WARNING = 0.3  # cores other processes keep busy: above it, the throughput is skewed

# Four training sets of unequal sizes and one test set: (prompt, target) from a row number.
TRAIN_SETS = {
    "add": (16, lambda i: (f"What is {i % 97} plus {(7 * i) % 89}?", str(i % 97 + 7 * i % 89))),
    "double": (24, lambda i: (f"Double the number {i}, please.", str(2 * i))),
    "successor": (32, lambda i: (f"Which number comes right after {i}?", str(i + 1))),
    "square": (20, lambda i: (f"What is the square of {i % 50}?", str((i % 50) ** 2))),
}
TEST_SETS = {
    "next_number": (16, lambda i: (f"What is the number that comes after {500 + i}?",
                                   str(501 + i))),
}
UNLEARN = {"optimizer": "adam", "learning_rate": 1e-4, "batch_size": 8, "max_steps": 2}
GRADIENTS = {"batch_size": 8}


# --- The model and the job ---


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """OPT's config with the chosen shape (model.config of a job spec)."""
    return {
        "model_type": "opt", "num_hidden_layers": args.layers, "hidden_size": args.hidden,
        "num_attention_heads": args.heads, "ffn_dim": args.ffn,
        "word_embed_proj_dim": args.hidden, "max_position_embeddings": args.positions,
        "do_layer_norm_before": True, "activation_function": "relu",
        "dropout": 0.1, "attention_dropout": 0.0,
    }


def save_model(folder: Path, args: argparse.Namespace) -> torch.nn.Module:
    """Build the random-init OPT for the byte tokenizer and save it as a model folder."""
    from transformers.utils import logging as hf_logging

    tok = byte_level_tokenizer()
    model = build_model(config_from_dict(model_config(args), len(tok), tok.eos_token_id))
    hf_logging.disable_progress_bar()
    model.save_pretrained(folder)
    return model


def write_data(folder: Path) -> None:
    """data.csv: prompt,target,dataset rows of every training and test set."""
    with (folder / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "target", "dataset"])
        for name, (rows, make) in {**TRAIN_SETS, **TEST_SETS}.items():
            for i in range(rows):
                writer.writerow([*make(i), name])


def write_job(folder: Path, model_dir: Path, args: argparse.Namespace) -> Path:
    """job.yaml: the four methods on the saved model, 2 actors of 1 CPU each."""
    def dataset(name: str) -> dict[str, str]:
        return {"name": name, "source": "data.csv", "subset": name}

    job = {
        "name": "scale-benchmark",
        "model": {"path": str(model_dir)},
        "tokenizer": {"kind": "byte", "max_length": args.max_length},
        "data": {"train": [dataset(n) for n in TRAIN_SETS],
                 "test": [dataset(n) for n in TEST_SETS]},
        "methods": {"untrac": dict(UNLEARN), "untrac_inv": dict(UNLEARN),
                    "graddot": dict(GRADIENTS), "gradcos": dict(GRADIENTS)},
        "evaluation": {"batch_size": 16, "max_examples": 16},
        "resources": {"num_actors": 2, "cpus_per_actor": 1, "local_cpus": 2,
                      "weights_dtype": args.weights_dtype},
        "tracking": {"experiment": "scale-benchmark"},
        "cache_dir": str(folder / "cache"),
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


# --- Part 1: RSS of a real run's driver and actors ---


@dataclass
class Peak:
    """A process's largest RSS seen, and the shared (object-store, file) pages in it then."""

    label: str
    rss: int = 0
    shared: int = 0

    def update(self, info: Any) -> None:
        if info.rss > self.rss:
            self.rss, self.shared = info.rss, info.shared


@dataclass
class RssSampler(Sampling):
    """Samples, every `interval` seconds in a thread, the RSS of a process and of its
    descendants whose command line shows `mark`; keeps each one's peak (by pid)."""

    pid: int
    interval: float = 0.2
    mark: str = ACTOR_MARK
    driver: Peak = field(default_factory=lambda: Peak("driver"))
    actors: dict[int, Peak] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self) -> None:
        self.start_sampling()

    def sample(self) -> None:
        root = psutil.Process(self.pid)
        self.driver.update(root.memory_info())
        for child in root.children(recursive=True):
            try:
                if self.mark in " ".join(child.cmdline()):
                    peak = self.actors.setdefault(child.pid, Peak(f"actor pid {child.pid}"))
                    peak.update(child.memory_info())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.samples += 1


@dataclass
class RunMemory:
    """Part 1's measurements."""

    seconds: float
    driver: Peak
    actors: list[Peak]
    samples: int


def measure_run(job: Path, folder: Path, interval: float) -> RunMemory:
    """`untrac-ray run job.yaml` as a subprocess, its driver and actors sampled throughout."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    log = folder / "run.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "untrac_ray.cli", "run", str(job), "--tracking-uri", uri,
             "-q"], stdout=out, stderr=subprocess.STDOUT, cwd=folder)
        with RssSampler(proc.pid, interval) as sampler:
            proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"untrac-ray run failed ({proc.returncode}):\n"
                         f"{log.read_text()[-3000:]}")
    return RunMemory(seconds, sampler.driver, list(sampler.actors.values()), sampler.samples)


# --- Part 2: the formula, with the runtime measured on an idle actor ---


@ray.remote(num_cpus=0)
class IdleActor:
    """A Ray actor that imports what a WorkbenchActor imports, and does nothing else."""

    def memory(self) -> tuple[int, int]:
        """(RSS, shared pages in it: the libraries' file-backed pages)."""
        import gc

        import torch  # noqa: F401
        import transformers  # noqa: F401

        import untrac_ray.engine.pool  # noqa: F401

        gc.collect()
        time.sleep(0.5)  # let lazy imports and threads settle
        info = psutil.Process().memory_info()
        return info.rss, info.shared


def runtime_rss() -> Peak:
    """The RSS of an idle actor that imported untrac_ray.engine.pool, torch and transformers, and
    the shared pages in it (Ray must be running)."""
    actor = IdleActor.remote()
    try:
        rss, shared = ray.get(actor.memory.remote())
    finally:
        ray.kill(actor)
    return Peak("idle actor", rss, shared)


def longest_row(data: PreparedData) -> int:
    """Tokens of the longest row of any set: the widest batch an unlearning step can pad to."""
    return max(int(np.diff(data.tokenized(n).offsets).max()) for n in data.sets)


def formula(model: torch.nn.Module, data: PreparedData,
            weights_dtype: str = "fp32") -> ActorMemory:
    """actor_memory for the job's settings: Adam, 8 rows of the longest row, the weights'
    dtype, the base weight set only, one test set read by the gradient tasks, a base model
    copy when the unlearning settings need one (NPO, the KL term; the job's do not)."""
    return actor_memory(model, optimizer=UNLEARN["optimizer"], rows=UNLEARN["batch_size"],
                        tokens=longest_row(data), weights_dtype=weights_dtype, weight_sets=1,
                        test_sets=len(TEST_SETS),
                        base_copy=needs_base_copy(UnlearnSpec(**UNLEARN)))


# --- Parts 3 and 4: unlearning throughput ---


@dataclass
class Workload:
    """The UnTrac tasks timed (evaluating nothing), the warm-up task (the first one as
    planned: it evaluates the test set after its last step), and their inputs."""

    spec: JobSpec
    data: PreparedData
    weights: SharedWeights
    warmup: UnlearnTask
    tasks: list[UnlearnTask]
    tokens: int  # labelled tokens of the timed tasks' ascent steps
    batch_tokens: int  # all tokens of their batches, padding included

    def bench_inputs(self) -> dict[str, Any]:
        """What a Workbench (or a ShardedWorkbench) is built from, besides the weights."""
        return {"datasets": {n: self.data.tokenized(n) for n in self.data.sets},
                "eval_indices": eval_sample(self.spec, self.data),
                "eval_batch_size": self.spec.evaluation.batch_size}


def ascent_tokens(task: UnlearnTask, data: PreparedData) -> tuple[int, int]:
    """The task's ascent steps' batches (the same seeded rows the task takes): their labelled
    tokens (the loss's) and all their tokens (rows x padded width: what the model computes)."""
    rows = data.tokenized(task.forget)
    s = task.settings
    labelled = computed = 0
    for step in batch_schedule(len(rows), s.batch_size, s.total_steps(len(rows)), s.seed):
        batch = rows.batch(step)
        labelled += label_count(batch)
        computed += batch["input_ids"].numel()
    return labelled, computed


def make_workload(job: Path, model: torch.nn.Module) -> Workload:
    """The job's UnTrac tasks with no set to evaluate, and the first one as planned (with its
    evaluation) as warm-up."""
    spec = load_spec(job)
    data = prepare_data(spec)
    n_rows = dict(data.n_rows)
    planned = plan_unlearning(spec, "untrac", data.train, data.test, n_rows).tasks
    tasks = [replace(t, evaluate=()) for t in planned if isinstance(t, UnlearnTask)]
    counts = [ascent_tokens(t, data) for t in tasks]
    return Workload(spec, data, SharedWeights.from_model(model), planned[0], tasks,
                    sum(c[0] for c in counts), sum(c[1] for c in counts))


@dataclass
class Throughput:
    """One way of running the tasks: their own seconds (summed; the slower rank's for a gang)
    and the wall time around them."""

    mode: str
    task_seconds: float
    wall_seconds: float
    warmup_loss: float  # the test set's loss after the warm-up task
    note: str = ""
    busy: float | None = None  # cores the whole machine kept busy during the timed tasks
    others: float | None = None  # cores it kept busy in an idle pause just before (not ours)






def last_loss(result: TaskResult) -> float:
    """The first evaluated set's loss at the task's last evaluation."""
    return next(iter(result.losses[max(result.losses)].values()))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_bare(work: Workload, threads: int) -> Throughput:
    """The tasks in this process on one Workbench with `threads` torch threads."""
    torch.set_num_threads(threads)
    bench = Workbench({BASE: work.weights}, device=device(), **work.bench_inputs())
    warmup = bench.run(work.warmup)
    ticks, start = machine_cpu(), time.perf_counter()
    results = [bench.run(t) for t in work.tasks]
    wall = time.perf_counter() - start
    return Throughput("bare", sum(r.seconds for r in results), wall, last_loss(warmup),
                      f"1 process, {threads} torch threads", busy_cores(ticks, machine_cpu()))


def run_engine(work: Workload, threads: int) -> tuple[Throughput, float]:
    """The tasks on an Engine of one actor of `threads` CPUs; also its start-up seconds."""
    gpus = 1.0 if torch.cuda.is_available() else 0.0
    resources = ResourcesSpec(num_actors=1, cpus_per_actor=threads, gpus_per_actor=gpus)
    inputs = work.bench_inputs()
    start = time.perf_counter()
    with Engine(resources, {BASE: work.weights}, work.data.sets,
                work.data.tokenizer.pad_token_id, inputs["eval_indices"],
                inputs["eval_batch_size"], max_useful_actors=1) as engine:
        engine.wait_ready()
        startup = time.perf_counter() - start
        (warmup,) = engine.map([work.warmup])
        ticks, start = machine_cpu(), time.perf_counter()
        results: list[TaskResult] = engine.map(work.tasks)
        wall = time.perf_counter() - start
        busy = busy_cores(ticks, machine_cpu())
    return Throughput("engine", sum(r.seconds for r in results), wall, last_loss(warmup),
                      f"1 actor, cpus_per_actor {threads}", busy), startup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gang_rank(rank: int, port: int, work: dict[str, Any], out: str) -> None:
    """One rank of the gang (a spawned process): join, build a ShardedWorkbench, warm up, run
    the tasks, and pickle their seconds, the wall time and this rank's parameter bytes."""
    from untrac_ray.engine.sharded import ShardedWorkbench, close_gang, init_gang

    # OPT's decoder layers return a .view() of their output, which FSDP2 warns of; no in-place
    # op follows it (modeling_opt), and the warm-up's loss is printed beside the bare loop's.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    torch.set_num_threads(1)
    where = f"cuda:{rank}" if work["cuda"] else "cpu"
    gang = init_gang(rank, GANG, "127.0.0.1", port, device=where)
    bench = ShardedWorkbench({BASE: work["weights"]}, gang=gang, **work["inputs"])
    warmup = bench.run(work["warmup"])
    ticks, start = machine_cpu(), time.perf_counter()
    results = [bench.run(t) for t in work["tasks"]]
    wall = time.perf_counter() - start
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps({
        "seconds": sum(r.seconds for r in results), "wall": wall, "loss": last_loss(warmup),
        "busy": busy_cores(ticks, machine_cpu()),
        "local_bytes": bench.local_bytes()}))
    close_gang()


def run_gang(work: Workload, folder: Path) -> tuple[Throughput, list[int]] | None:
    """The tasks on a gang of GANG spawned processes (1 thread each); the slowest rank's
    seconds, and each rank's parameter bytes. None when CUDA has fewer than GANG GPUs."""
    import torch.multiprocessing as mp

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < GANG:
        return None
    payload = {"weights": work.weights, "inputs": work.bench_inputs(), "warmup": work.warmup,
               "tasks": work.tasks, "cuda": cuda}
    context = mp.start_processes(gang_rank, args=(free_port(), payload, str(folder)),
                                 nprocs=GANG, join=False, start_method="spawn")
    deadline = time.monotonic() + GANG_TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise SystemExit(f"the gang did not finish within {GANG_TIMEOUT_S} s")
    ranks = [pickle.loads((folder / f"rank{r}.pkl").read_bytes()) for r in range(GANG)]
    note = f"{GANG} processes, 1 torch thread each, {'nccl' if cuda else 'gloo'}"
    gang = Throughput(f"FSDP x{GANG}", max(r["seconds"] for r in ranks),
                      max(r["wall"] for r in ranks), ranks[0]["loss"], note, ranks[0]["busy"])
    return gang, [r["local_bytes"] for r in ranks]


# --- Printing ---


def mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


def cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def print_header(args: argparse.Namespace, model: torch.nn.Module) -> None:
    params = sum(p.numel() for p in model.parameters())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores "
          f"({psutil.cpu_count(logical=False)} physical), "
          f"{psutil.virtual_memory().total / GB:.1f} GB memory; {load()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}"
          f", device for parts 3-4: {device()}")
    print(f"model: opt, {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, "
          f"{args.heads} heads, {args.positions} positions, byte tokenizer "
          f"(vocab {model.config.vocab_size}): {params / 1e6:.2f}M parameters "
          f"({mb(4 * params)} in float32)")
    sizes = ", ".join(f"{n} {rows}" for n, (rows, _) in TRAIN_SETS.items())
    tests = ", ".join(f"{n} {rows}" for n, (rows, _) in TEST_SETS.items())
    print(f"data: training sets {sizes}; test set {tests} (rows); max_length {args.max_length}")
    print(f"job: untrac + untrac_inv ({UNLEARN}), graddot + gradcos ({GRADIENTS}), "
          "evaluation.max_examples 16; 2 actors x 1 CPU, local_cpus 2; RSS sampled every "
          f"{args.interval} s; throughput with T = {args.threads} threads")
    print(flush=True)


def print_memory(run: RunMemory, runtime: Peak, terms: ActorMemory, tokens: int,
                 weights_dtype: str = "fp32") -> None:
    """Parts 1 and 2: the driver's peak, each actor's against the formula (the shared and the
    private pages apart), the formula's terms."""
    print(f"\n== 1. driver peak RSS (untrac-ray run: {run.seconds:.0f} s, "
          f"{run.samples} samples, {len(run.actors)} actors seen)")
    d = run.driver
    print(f"  driver  {mb(d.rss):>9}  (shared {mb(d.shared)})  target < {DRIVER_TARGET / GB:.1f} "
          f"GB  {verdict(d.rss < DRIVER_TARGET)}")
    total = terms.total(runtime.rss)
    # The formula's shared pages: the libraries (the idle actor's) and the weights it maps.
    shared = runtime.shared + terms.shared_weights + terms.shared_gradients
    print(f"\n== 2. actor peak RSS / formula (memory.actor_memory: Adam, 8 rows x {tokens} "
          f"tokens, {weights_dtype}, 1 weight set, {len(TEST_SETS)} test set)")
    for a in run.actors:
        ratio = a.rss / total
        print(f"  {a.label:<16} {mb(a.rss):>9}  (shared {mb(a.shared)})  formula {mb(total)}  "
              f"ratio {ratio:.2f}  target <= {FORMULA_TARGET}  {verdict(ratio <= FORMULA_TARGET)}")
        print(f"    private {mb(a.rss - a.shared)} (formula {mb(total - shared)}); shared "
              f"{mb(a.shared)} = libraries {mb(runtime.shared)} + shared weights "
              f"{mb(terms.shared_weights)} + test gradients {mb(terms.shared_gradients)} "
              f"{'+' if a.shared >= shared else '-'} {mb(abs(a.shared - shared))}")
    unlearning = (terms.gradients + terms.optimizer + terms.base_copy
                  + max(terms.activations, terms.rounding))
    print("  the formula's terms:")
    rows = [("runtime (idle actor, measured)", runtime.rss),
            ("  of which shared (libraries)", runtime.shared), ("weights", terms.weights),
            ("shared weights (object store)", terms.shared_weights),
            ("test gradients read (object store)", terms.shared_gradients),
            ("unlearning step", unlearning), ("  gradients", terms.gradients),
            ("  optimizer state (Adam)", terms.optimizer),
            ("  base model copy (NPO, KL term)", terms.base_copy),
            ("  activations", terms.activations),
            ("  or a bf16 step's float32 copies", terms.rounding),
            ("gradient task (grad, flat)", terms.gradient_task)]
    for name, value in rows:
        print(f"    {name:<36} {mb(value):>9}")
    print(f"    total = runtime + weights + mapped + max(unlearning step, gradient task) = "
          f"{mb(total)}")


def print_throughput(rows: list[Throughput], startup: float, work: Workload) -> None:
    """Parts 3 and 4: tokens/s of each way, and the ratios to the bare loop."""
    print(f"\n== 3-4. unlearning throughput: {len(work.tasks)} UnTrac tasks, "
          f"{work.tokens} labelled tokens ({work.batch_tokens} tokens with prompts and padding) "
          f"in their ascent steps; engine start-up {startup:.1f} s, not included")
    bare = rows[0]
    print(f"  {'mode':<8} {'task s':>7} {'labelled tok/s':>15} {'all tok/s':>10} {'/ bare':>7}"
          f"   {'wall s':>7} {'/ bare':>7}   {'busy':>5} {'others':>6}   how")
    for r in rows:
        print(f"  {r.mode:<8} {r.task_seconds:7.2f} {work.tokens / r.task_seconds:15.1f} "
              f"{work.batch_tokens / r.task_seconds:10.1f} "
              f"{bare.task_seconds / r.task_seconds:7.3f}   {r.wall_seconds:7.2f} "
              f"{bare.wall_seconds / r.wall_seconds:7.3f}   {cores(r.busy):>5} "
              f"{cores(r.others):>6}   {r.note}")
    print("  task s: the tasks' own seconds (TaskResult.seconds; a gang: its slower rank); "
          "wall s: around the map (engine) or the loop; / bare: tokens/s over the bare loop's;"
          " busy: cores the machine kept busy meanwhile; others: cores it kept busy in an idle "
          "pause just before (other processes')")
    losses = ", ".join(f"{r.mode} {r.warmup_loss:.6f} "
                       f"(diff {r.warmup_loss - bare.warmup_loss:+.1e})" for r in rows)
    print(f"  same work: the test set's loss after the warm-up task (unlearn "
          f"{work.warmup.forget!r}): {losses}; a gang draws its dropout masks per rank, so it "
          "differs slightly")
    busiest = max((r.others for r in rows if r.others is not None), default=0.0)
    if busiest > OTHERS_WARNING:
        print(f"  warning: other processes kept up to {busiest:.2f} cores busy: these figures "
              "are skewed; rerun on a quiet machine")


def print_shards(params: int, local: list[int]) -> None:
    """Part 4's memory: each rank's parameter + Adam-state bytes against one process's."""
    one = 3 * 4 * params  # float32 parameters and two Adam moments
    print(f"\n== 4. parameters + Adam state (2 moments) per process: one process "
          f"{mb(one)}")
    for rank, n in enumerate(local):
        print(f"  rank {rank} of {len(local)}  params {mb(n)} + Adam {mb(2 * n)} = {mb(3 * n)}  "
              f"({3 * n / one:.3f} of one process)")


# --- Main ---


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny OPT (2 layers, hidden 64), every part, 1-3 minutes")
    parser.add_argument("--layers", type=int, help="default 12 (smoke 2)")
    parser.add_argument("--hidden", type=int, help="default 768 (smoke 64)")
    parser.add_argument("--heads", type=int, help="default 12 (smoke 2)")
    parser.add_argument("--ffn", type=int, help="default 3072 (smoke 128)")
    parser.add_argument("--positions", type=int, default=256, help="max_position_embeddings")
    parser.add_argument("--max-length", type=int, default=64, help="tokenizer.max_length")
    parser.add_argument("--threads", type=int, default=2,
                        help="T: torch threads of the bare loop, cpus_per_actor of the engine")
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, s")
    parser.add_argument("--weights-dtype", choices=["fp32", "bf16"], default="fp32",
                        help="the job's actors' resources.weights_dtype (parts 1 and 2)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of idling before each throughput run, to measure the "
                             "load of other processes (not timed)")
    args = parser.parse_args(argv)
    shape = {"layers": (12, 2), "hidden": (768, 64), "heads": (12, 2), "ffn": (3072, 128)}
    for name, (full, smoke) in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="untrac-scale-") as tmp:
        folder = Path(tmp)
        model = save_model(folder / "model", args)
        print_header(args, model)
        write_data(folder)
        job = write_job(folder, folder / "model", args)

        print("part 1: untrac-ray run ...", flush=True)
        run = measure_run(job, folder, args.interval)
        work = make_workload(job, model)
        terms = formula(model, work.data, args.weights_dtype)

        print("part 3: bare loop ...", flush=True)
        others = others_load(args.settle)
        bare = run_bare(work, args.threads)
        bare.others = others
        ensure_ray(ResourcesSpec(local_cpus=max(args.threads, os.cpu_count() or 1)))
        try:
            print("part 2: idle actor (the runtime term) ...", flush=True)
            runtime = runtime_rss()  # the formula's runtime term
            print("part 3: engine ...", flush=True)
            others = others_load(args.settle)
            engine, startup = run_engine(work, args.threads)
            engine.others = others
        finally:
            ray.shutdown()
        print("part 4: FSDP gang ...", flush=True)
        others = others_load(args.settle)
        gang = run_gang(work, folder)
        if gang:
            gang[0].others = others
        tokens = longest_row(work.data)

    print_memory(run, runtime, terms, tokens, args.weights_dtype)
    rows = [bare, engine] + ([gang[0]] if gang else [])
    print_throughput(rows, startup, work)
    if gang:
        print_shards(sum(p.numel() for p in model.parameters()), gang[1])
    else:
        print(f"\n== 4. skipped: a gang on CUDA needs {GANG} GPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
