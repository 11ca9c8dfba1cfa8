"""The sharded bench (untrac_ray/engine/sharded.py): a gang of 2 CPU processes (gloo) running the
real tasks on one FSDP2-sharded tiny Llama returns what one Workbench returns.

One gang is started per module (starting processes that import torch and transformers is
most of the time); it runs every task of `gang_tasks`, while this process computes the
same tasks on a Workbench. Dropout is off, so the two differ only by float32 rounding (sums
taken in another order across ranks): TOL below. A second gang measures the memory each rank
holds for a bigger Llama against one process.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import resource
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

WORLD = 2
TOL = 1e-4  # relative on losses, absolute on cells (losses of order 1); measured: < 1e-6
TIMEOUT_S = 150
CLIP = 1.0  # UnTrac-Inv's max_grad_norm: below its gradients' norms, so it clips
LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
}
BIG_LLAMA = {**LLAMA, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 300}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- What the gang's processes run (module-level: spawned processes import this module) ---


def gang_worker(rank: int, port: int, inputs: dict[str, Any], out: str) -> None:
    """One rank: join the gang, run every task on a ShardedWorkbench, pickle the results."""
    from untrac_ray.engine.sharded import ShardedWorkbench, close_gang, init_gang

    torch.set_num_threads(1)
    listen_fd = None
    if rank == 0:  # as gang.rendezvous_address does: the store listens on that address only
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        sock.listen()
        listen_fd = sock.detach()
    gang = init_gang(rank, WORLD, "127.0.0.1", port, backend="gloo", device="cpu",
                     listen_fd=listen_fd)
    bench = ShardedWorkbench(inputs["weights"], inputs["datasets"], inputs["indices"],
                             inputs["eval_batch_size"], gang)
    results = [(r.losses, r.row_losses, r.seconds) for r in map(bench.run, inputs["tasks"])]
    bench.reset("base")
    base = bench.full_arrays()
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(
        {"results": results, "base": base, "listening": listening(), "rank": bench.rank}))
    close_gang()


def listening() -> list[str]:
    """The local addresses this process listens on (TCP), after the gang's collectives ran."""
    import psutil

    return sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN})


def memory_worker(rank: int, port: int, world: int, out: str) -> None:
    """Take two Adam steps on the bigger Llama, sharded over `world` ranks (whole when world is
    1), and record this process's parameter, gradient and optimizer-state bytes, how much its
    resident memory grew (rss) and its peak. A first run on the tiny Llama warms up (imports,
    gloo's buffers), so the growth is the model's."""
    from untrac_ray.engine.sharded import close_gang, init_gang

    torch.set_num_threads(1)
    gang = init_gang(rank, world, "127.0.0.1", port, backend="gloo", device="cpu") \
        if world > 1 else None
    two_adam_steps({**LLAMA, "vocab_size": 300}, gang)
    before = rss()
    model, optimizer = two_adam_steps(BIG_LLAMA, gang)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in
             (p.grad for p in model.parameters()) if g is not None]
    state = [v.to_local() if hasattr(v, "to_local") else v for s in optimizer.state.values()
             for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    stats = {"params": nbytes(local), "grads": nbytes(grads), "optimizer": nbytes(state),
             "rss_gain": rss() - before, "peak_gain": peak_rss() - before}
    Path(out, f"mem{world}_rank{rank}.pkl").write_bytes(pickle.dumps(stats))
    if gang is not None:
        close_gang()


def two_adam_steps(values: dict[str, Any], gang) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A Llama of `values` (whole, or sharded over the gang: its shards drawn at random) after
    two Adam steps on random tokens; returns it and its optimizer."""
    from untrac_ray.compute.modeling import build_model, config_from_dict
    from untrac_ray.compute.optim import make_optimizer
    from untrac_ray.engine.sharded import GangModel, local_tensors, shard_model

    config = config_from_dict(values)
    if gang is None:
        model = build_model(config)
    else:
        sharded = shard_model(config.to_dict(), gang)
        with torch.no_grad():
            for t in local_tensors(sharded).values():
                t.normal_(0.0, 0.02)
        model = GangModel(sharded, gang)
    optimizer = make_optimizer("adam", model.parameters(), 1e-4)
    ids = torch.randint(0, 300, (4, 32))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().mean().backward()
        optimizer.step()
    return model, optimizer


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """This process's resident memory now, in bytes, once glibc has returned the heap memory
    freed so far to the system (FSDP's all-gather buffers come and go every layer, and the
    freed heap would otherwise count)."""
    import ctypes

    import psutil

    with contextlib.suppress(OSError, AttributeError):  # not glibc: count the freed heap too
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def start(fn, args: tuple, nprocs: int):
    """Start nprocs spawned processes running fn(rank, *args), without waiting for them."""
    import torch.multiprocessing as mp

    return mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")


def wait(context, timeout_s: float = TIMEOUT_S) -> None:
    """Join spawned processes; kill them (ours) and fail when they run past timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the gang did not finish within {timeout_s} s")


# --- The inputs: the tiny job's data, a Llama without dropout, and the tasks ---


def llama_inputs(tmp: Path, config: dict[str, Any] = LLAMA) -> dict[str, Any]:
    """Tokenized data of the tests' tiny job, a tiny model's (Llama's) base and initial
    weights, every row evaluated."""
    from conftest import merge, tiny_spec
    from untrac_ray.compute.evaluation import sample_indices
    from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.run.job_setup import prepare_data

    job = tmp / "job.yaml"
    spec = merge(tiny_spec(tmp), {"model": None})  # replace the GPT-2 config, not merge into it
    job.write_text(yaml.safe_dump(merge(spec, {"model": {"config": config}})))
    spec = load_spec(job)
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    weights = {"base": SharedWeights.from_model(build_model(config, seed=0)),
               "init/1": SharedWeights.from_model(build_model(config, seed=1))}
    return {
        "spec": spec,
        "weights": weights,
        "datasets": {n: data.tokenized(n) for n in data.sets},
        "indices": {n: sample_indices(data.n_rows[n], None, 0) for n in data.sets},
        "eval_batch_size": 5,
    }


def gang_tasks(spec) -> dict[str, Any]:
    """The tasks compared, by name: UnTrac with Adam (batches of 5 rows: uneven splits),
    UnTrac with micro-batches of 2 and clipping, UnTrac-Inv with SGD and clipping, base
    losses and leave-dataset-out retraining (AdamW)."""
    from untrac_ray.inputs.spec_methods import UnlearnSpec
    from untrac_ray.methods.tasks import EvalTask, LdoTask, UnlearnTask

    train, test = ("add_one", "double", "spell"), ("next_number", "twice")

    def untrac(optimizer: str, **kw) -> UnlearnTask:
        settings = UnlearnSpec(**{"optimizer": optimizer, "learning_rate": 1e-2,
                                  "batch_size": 5, "max_steps": 4, **kw})
        return UnlearnTask("untrac", "add_one", test, settings, (1, 2, 4), per_row=True)

    inv = UnlearnSpec(optimizer="sgd", learning_rate=0.5, batch_size=7, max_steps=3,
                      max_grad_norm=CLIP)
    return {
        "untrac_adam": untrac("adam"),
        "untrac_micro_clip": untrac("adam", micro_batch_size=2, max_grad_norm=0.5),
        # plain SGD, unclipped: its step is the gradient itself, so a gradient scaled wrong
        # (the gang's gathered rows counted once per rank, say) moves the cells
        "untrac_sgd_micro": untrac("sgd", micro_batch_size=2, learning_rate=0.3),
        "untrac_inv_sgd": UnlearnTask("untrac_inv", "next_number", train, inv, (1, 2, 3)),
        "base": EvalTask(train + test, per_row=True),
        "ldo": LdoTask("double", train, test, spec.training.model_copy(
            update={"max_steps": 3, "batch_size": 7}), seed=1),
    }


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict[str, Any]:
    """The tasks' results from the gang (each rank's) and from one Workbench, side by side."""
    from untrac_ray.methods.workbench import Workbench

    tmp = tmp_path_factory.mktemp("sharded")
    inputs = llama_inputs(tmp)
    tasks = gang_tasks(inputs["spec"])
    gang_inputs = {k: inputs[k] for k in ("weights", "datasets", "indices", "eval_batch_size")}
    started = time.perf_counter()
    context = start(gang_worker, (free_port(), {**gang_inputs, "tasks": list(tasks.values())},
                                  str(tmp)), WORLD)
    bench = Workbench(inputs["weights"], inputs["datasets"], inputs["indices"],
                      inputs["eval_batch_size"])
    reference = {name: bench.run(task) for name, task in tasks.items()}
    inv = tasks["untrac_inv_sgd"]
    unclipped = replace(inv, settings=inv.settings.model_copy(update={"max_grad_norm": None}))
    reference["unclipped_inv"] = bench.run(unclipped)
    sgd = tasks["untrac_sgd_micro"]  # its gradients doubled: the same steps at twice the rate
    reference["sgd_doubled"] = bench.run(replace(sgd, settings=sgd.settings.model_copy(
        update={"learning_rate": 2 * sgd.settings.learning_rate})))
    wait(context)
    print(f"\ngang of {WORLD}: {time.perf_counter() - started:.1f} s in all")
    ranks = [pickle.loads((tmp / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    return {"tasks": tasks, "reference": reference, "ranks": ranks, "inputs": inputs}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def task_losses(results: list, tasks: dict[str, Any], name: str) -> dict[int, dict[str, float]]:
    """One rank's losses[step][dataset] of the named task."""
    return results[list(tasks).index(name)][0]


def max_cell_diff(compared: dict[str, Any], name: str) -> tuple[float, float]:
    """Over every rank: the largest relative difference of a task's losses from the
    Workbench's, and the largest absolute difference of the UnTrac cells they make (loss at
    a step minus the base loss, each side with its own base EvalTask's)."""
    tasks, ref = compared["tasks"], compared["reference"]
    worst_rel = worst_cell = 0.0
    for rank in compared["ranks"]:
        got = task_losses(rank["results"], tasks, name)
        got_base = task_losses(rank["results"], tasks, "base")[0]
        assert got.keys() == ref[name].losses.keys()
        for step, row in got.items():
            for ds, value in row.items():
                want = ref[name].losses[step][ds]
                worst_rel = max(worst_rel, rel_diff(value, want))
                cell, want_cell = value - got_base[ds], want - ref["base"].losses[0][ds]
                worst_cell = max(worst_cell, abs(cell - want_cell))
    print(f"\n{name}: max relative loss difference {worst_rel:.2e}, "
          f"max cell difference {worst_cell:.2e}")
    return worst_rel, worst_cell


# --- The tests ---


def test_ranks_load_their_shards_of_the_shared_weights(compared):
    """Every rank's shards, gathered, are the shared base weights, bit for bit."""
    arrays = compared["inputs"]["weights"]["base"].arrays
    for rank in compared["ranks"]:
        assert rank["base"].keys() == arrays.keys()
        for name, value in arrays.items():
            np.testing.assert_array_equal(rank["base"][name], value, err_msg=name)


def test_each_rank_draws_its_own_dropout_masks(compared, bench_parts):
    """A rank of a gang takes its own rows of every batch, so it must draw its own dropout
    masks for them, as one process draws independent masks for every row: each rank's bench
    knows its rank, and the loops seed dropout from (seed, rank). Rank 0 keeps the seed of a
    single process. With one seed for every rank (before), ranks 0 and 1 unlearned alike."""
    from untrac_ray.inputs.spec_methods import UnlearnSpec
    from untrac_ray.methods.tasks import UnlearnTask
    from untrac_ray.methods.workbench import Workbench

    assert [rank["rank"] for rank in compared["ranks"]] == list(range(WORLD))
    weights, sets, indices = bench_parts
    bench = Workbench({"base": weights}, sets, indices, 16)  # GPT-2, dropout 0.1 (training)
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.5, batch_size=4, max_steps=3)
    task = UnlearnTask("untrac", "add_one", ("next_number", "twice"), settings, (3,))
    alone = bench.run(task).losses[3]
    bench.rank = 0
    assert bench.run(task).losses[3] == alone
    bench.rank = 1
    other = bench.run(task).losses[3]
    assert max(abs(other[n] - alone[n]) for n in alone) > 1e-4  # other masks, other steps
    bench.model.config.resid_pdrop = 0.0  # no dropout: the rank changes nothing
    for module in bench.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    bench.rank = 0
    plain = bench.run(task).losses[3]
    bench.rank = 1
    assert bench.run(task).losses[3] == plain


def test_base_losses_and_rows_match_one_process(compared):
    """Evaluation split across ranks (sets of 6 to 24 rows, batches of 5: some ranks run a
    dummy batch) gathers the same mean and per-row losses as one process."""
    ref = compared["reference"]["base"]
    i = list(compared["tasks"]).index("base")
    for rank in compared["ranks"]:
        losses, rows, _ = rank["results"][i]
        for name, value in ref.losses[0].items():
            assert rel_diff(losses[0][name], value) < TOL
            np.testing.assert_allclose(rows[name], ref.row_losses[name], rtol=TOL)


@pytest.mark.parametrize("name", ["untrac_adam", "untrac_micro_clip", "untrac_sgd_micro"])
def test_untrac_cells_match_one_process(compared, name):
    """UnTrac (forget a training set, evaluate the test sets at steps 1, 2 and 4) gives the
    same cells on every rank of the gang as on one Workbench: Adam with 5-row batches (3 + 2
    rows per rank), micro-batches of 2, 2 and 1 rows (the last: one rank's share empty,
    padded) with global-norm clipping, and the same micro-batches with plain SGD, unclipped,
    which follows the gradient's scale (Adam and clipping hide it)."""
    rel, cell = max_cell_diff(compared, name)
    assert rel < TOL and cell < TOL
    ref = compared["reference"][name].row_losses
    i = list(compared["tasks"]).index(name)
    for rank in compared["ranks"]:
        rows = rank["results"][i][1]
        for ds, values in ref.items():
            np.testing.assert_allclose(rows[ds], values, rtol=TOL)


def test_untrac_inv_cells_match_one_process(compared):
    """UnTrac-Inv (forget a test set with SGD clipped to the global gradient norm CLIP,
    7-row batches: 4 + 3 rows per rank, evaluate the training sets) gives the same cells as
    one Workbench."""
    rel, cell = max_cell_diff(compared, "untrac_inv_sgd")
    assert rel < TOL and cell < TOL


def test_leave_dataset_out_training_matches_one_process(compared):
    """LdoTask (reset to another weight set, train 3 steps with AdamW and clipping) matches
    too."""
    rel, _ = max_cell_diff(compared, "ldo")
    assert rel < TOL


def test_a_gang_on_loopback_listens_on_loopback_only(compared):
    # the rendezvous store, and gloo's data sockets (pinned to the interface that reaches
    # the rendezvous, not the one the host name resolves to)
    for rank in compared["ranks"]:
        assert rank["listening"] and set(rank["listening"]) <= {"127.0.0.1"}, rank["listening"]


def test_gloo_and_nccl_are_pinned_to_the_interface_that_reaches_the_rendezvous(monkeypatch):
    import psutil

    from untrac_ray.engine.sharded import SOCKET_INTERFACE_VARS, interface_towards, pin_data_sockets

    loopback = interface_towards("127.0.0.1", 29500)
    assert any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[loopback])
    for var in SOCKET_INTERFACE_VARS:
        monkeypatch.delenv(var, raising=False)
    pin_data_sockets("127.0.0.1", 29500)
    assert all(os.environ[var] == loopback for var in SOCKET_INTERFACE_VARS)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "mine")  # the user's choice is kept
    pin_data_sockets("127.0.0.1", 29500)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "mine"


def test_comparisons_are_not_vacuous(compared):
    """Unlearning changed the test losses, clipping UnTrac-Inv's gradients changed its losses,
    and doubling SGD's gradients changes its losses, by far more than TOL."""
    ref = compared["reference"]
    moved = max(abs(ref["untrac_adam"].losses[4][n] - ref["base"].losses[0][n])
                for n in ("next_number", "twice"))
    clipped = max(abs(ref["untrac_inv_sgd"].losses[3][n] - ref["unclipped_inv"].losses[3][n])
                  for n in ("add_one", "double", "spell"))
    assert moved > 1000 * TOL and clipped > 1000 * TOL
    # a gradient twice (or half) what it should be moves unclipped SGD's cells far past TOL
    doubled = max(abs(ref["untrac_sgd_micro"].losses[4][n] - ref["sgd_doubled"].losses[4][n])
                  for n in ("next_number", "twice"))
    assert doubled > 100 * TOL, doubled


@pytest.mark.slow  # a measurement (30 s); benchmarks/scale.py reports the same
def test_sharding_shrinks_the_memory_per_process(tmp_path, monkeypatch):
    """A bigger Llama (hidden 512, 8 layers, 25M parameters): each of 2 ranks holds half the
    parameter, gradient and Adam-state bytes that one process holds, and its resident memory
    grows by less (the peak is printed: transient gather buffers make it noisy on a busy
    machine, where it once matched one process's)."""
    # glibc: blocks over 64 KiB get their own mappings, unmapped when freed, so the peak
    # resident memory is that of live tensors (not of freed heap kept for reuse).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    context = start(memory_worker, (free_port(), WORLD, str(tmp_path)), WORLD)
    wait(context)
    context = start(memory_worker, (0, 1, str(tmp_path)), 1)
    wait(context)
    one = pickle.loads((tmp_path / "mem1_rank0.pkl").read_bytes())
    ranks = [pickle.loads((tmp_path / f"mem{WORLD}_rank{r}.pkl").read_bytes())
             for r in range(WORLD)]
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"\none process: params {mib(one['params'])}, grads {mib(one['grads'])}, "
          f"Adam state {mib(one['optimizer'])}; RSS grew {mib(one['rss_gain'])} "
          f"(peak: {mib(one['peak_gain'])} above the start)")
    for r, s in enumerate(ranks):
        print(f"rank {r} of {WORLD}: params {mib(s['params'])}, grads {mib(s['grads'])}, "
              f"Adam state {mib(s['optimizer'])}; RSS grew {mib(s['rss_gain'])} "
              f"(peak: {mib(s['peak_gain'])} above the start)")
    assert sum(s["params"] for s in ranks) == one["params"]
    for s in ranks:
        for key in ("params", "grads", "optimizer"):
            assert s[key] <= math.ceil(one[key] / WORLD) + 2**16, key
        assert s["rss_gain"] < 0.8 * one["rss_gain"]


def test_tasks_a_sharded_bench_cannot_run_are_refused():
    """Gradient and EK-FAC tasks, and Adafactor (plain-tensor state), fail with a clear error
    before any collective, the same on every rank."""
    from untrac_ray.engine.sharded import check_sharded_task
    from untrac_ray.inputs.spec_methods import EkfacSpec, UnlearnSpec
    from untrac_ray.methods.tasks import EkfacTask, GradientTask, UnlearnTask

    with pytest.raises(ValueError, match="cannot run GradientTask"):
        check_sharded_task(GradientTask("base", "add_one", True, 4))
    with pytest.raises(ValueError, match="cannot run EkfacTask"):
        check_sharded_task(EkfacTask(("a",), ("b",), EkfacSpec()))
    adafactor = UnlearnSpec(optimizer="adafactor", max_steps=1)
    with pytest.raises(ValueError, match="'adafactor' cannot update sharded parameters"):
        check_sharded_task(UnlearnTask("untrac", "a", ("b",), adafactor, (1,)))
    check_sharded_task(UnlearnTask("untrac", "a", ("b",), UnlearnSpec(max_steps=1), (1,)))


@pytest.mark.parametrize(("n_rows", "world"), [(5, 2), (1, 2), (7, 3), (0, 2), (8, 4)])
def test_row_shares_cover_the_rows_in_order(n_rows, world):
    """Contiguous shares of ceil(n / N) rows: concatenated in rank order they are the rows."""
    from untrac_ray.engine.sharded import Gang, row_share

    shares = [row_share(n_rows, Gang(r, world, torch.device("cpu"), None)) for r in range(world)]
    assert [i for start, stop in shares for i in range(start, stop)] == list(range(n_rows))
    assert all(stop - start <= math.ceil(n_rows / world) for start, stop in shares)
