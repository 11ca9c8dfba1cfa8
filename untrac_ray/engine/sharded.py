"""A bench for models larger than one device: N processes of one torch.distributed process
group (a "gang") hold one FSDP2-sharded model and run the same task in lockstep.

Each process owns a `ShardedWorkbench`, the sharded counterpart of workbench.Workbench, with
the interface the tasks use (tasks.Bench): the unchanged EvalTask, UnlearnTask and LdoTask
run on it and every rank returns the same result as one Workbench would.

- Weights, gradients and optimizer state are sharded (`fully_shard` per transformer block,
  then the root): each rank holds about 1/N of them. The model is built on the meta device,
  so no rank ever holds all the weights, and each rank copies only its own slice of the
  shared (host) arrays into its shards.
- Data parallel: `bench.model` is a `GangModel`, which runs each batch's rows split across
  the ranks (contiguous shares) and gathers the logits, so the loss is the whole batch's,
  normalised as in one process; gradients reach the shards through FSDP's averaging.
- Evaluation splits the evaluated rows across ranks and gathers the per-row losses only.

Pure PyTorch: no Ray here. An engine's gang actors call `init_gang` (the rendezvous: one
address and port that rank 0 listens on), build a ShardedWorkbench and call `run(task)` on
every rank with the same task; `close_gang` ends the group.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig

from untrac_ray.compute.modeling import SharedWeights, auto_class, token_losses
from untrac_ray.compute.precision import check_precision, precision_context
from untrac_ray.inputs.tokenization import TokenizedSet
from untrac_ray.methods.tasks import (
    BASE,
    EvalTask,
    LdoTask,
    Output,
    SubsetTask,
    Task,
    TaskResult,
    UnlearnTask,
)

__all__ = [
    "SHARDED_OPTIMIZERS",
    "Gang",
    "GangModel",
    "ShardedWorkbench",
    "check_sharded_task",
    "close_gang",
    "default_backend",
    "init_gang",
    "shard_model",
]


# Optimizers of unlearning.make_optimizer whose updates are elementwise, so they work on
# DTensor shards as they are (LdoTask's AdamW too).
SHARDED_OPTIMIZERS = ("adam", "adamw", "sgd")


# --- The gang: one process group, one device per rank ---


@dataclass(frozen=True)
class Gang:
    """This process's place in the gang: its rank, the gang's size, its device and the 1-D
    device mesh FSDP shards over (all ranks)."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh


def default_backend(device: torch.device | str) -> str:
    """NCCL on CUDA devices, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


SOCKET_INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_towards(address: str, port: int) -> str | None:
    """The name of this machine's network interface that reaches `address` (the one the
    system routes through; the loopback interface for 127.0.0.1), or None when unknown."""
    import psutil

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # no packet is sent
        try:
            probe.connect((address, port))
        except OSError:
            return None
        local = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == local for a in addresses):
            return name
    return None


def pin_data_sockets(master_addr: str, master_port: int) -> None:
    """Make gloo and NCCL open their data sockets on the interface that reaches the gang's
    rendezvous, not on the one the host name resolves to: on an embedded local Ray that is
    the loopback interface, so nothing of a gang listens beyond the machine. A variable the
    user set is kept."""
    name = interface_towards(master_addr, master_port)
    if name is not None:
        for var in SOCKET_INTERFACE_VARS:
            os.environ.setdefault(var, name)


def init_gang(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    device: torch.device | str | None = None,
    timeout_s: float = 600.0,
    listen_fd: int | None = None,
) -> Gang:
    """Join the gang's process group (rank 0 listens on master_addr:master_port; every rank
    must call this with the same address, port and world size).

    `device` defaults to the current CUDA device when there is one (Ray gives each GPU actor
    its own GPU as cuda:0), else the CPU; `backend` to default_backend(device). `listen_fd`
    (rank 0): a socket already listening at master_addr:master_port, which the rendezvous
    store takes over, so that it listens on that address only (not on every interface) and
    no other process can take the port meanwhile.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or default_backend(device)
    if not dist.is_initialized():
        pin_data_sockets(master_addr, master_port)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                              timeout=timeout, master_listen_fd=listen_fd)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
    mesh = init_device_mesh(device.type, (world_size,))
    return Gang(rank=rank, world_size=world_size, device=device, mesh=mesh)


def close_gang() -> None:
    """Leave the process group (after the last collective of every rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def row_share(n_rows: int, gang: Gang) -> tuple[int, int]:
    """This rank's rows [start, stop) of n_rows: contiguous shares of ceil(n_rows / N) rows,
    the last ones shorter (possibly empty), so gathered shares keep the rows' order."""
    per = math.ceil(n_rows / gang.world_size)
    start = min(gang.rank * per, n_rows)
    return start, min(start + per, n_rows)


# --- Building and loading a sharded model ---


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules' parameters on the meta device (no memory) but their buffers for real:
    buffers such as rotary frequencies are computed from the config at construction and are
    not part of the shared weights, so nothing else could restore them."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":  # a tied parameter stays itself
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def block_classes(model: torch.nn.Module) -> set[str]:
    """Names of the model's transformer-block classes (Hugging Face's _no_split_modules:
    the units that must stay whole on one device), each sharded as one FSDP unit."""
    return set(getattr(model, "_no_split_modules", None) or ())


def shard_model(config: dict[str, Any], gang: Gang) -> torch.nn.Module:
    """A model of `config` (SharedWeights.config) sharded over the gang, its parameters
    uninitialised (load them with load_shards): FSDP2 per transformer block, then the root."""
    values = dict(config)
    hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
    with parameters_on_meta():
        model = auto_class(hf_config).from_config(hf_config)
    blocks = block_classes(model)
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=gang.mesh)
    fully_shard(model, mesh=gang.mesh)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=gang.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return model


def local_slice(array: np.ndarray, param: torch.Tensor) -> np.ndarray:
    """The part of a full (host) array that this rank's shard of `param` holds."""
    if not isinstance(param, DTensor):
        return array
    (placement,) = param.placements
    if not isinstance(placement, Shard):
        return array
    mesh = param.device_mesh
    n = array.shape[placement.dim]
    per = math.ceil(n / mesh.size())
    start = min(mesh.get_local_rank() * per, n)
    index = [slice(None)] * array.ndim
    index[placement.dim] = slice(start, min(start + per, n))
    return array[tuple(index)]


def load_shards(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy each parameter's slice of the full arrays (SharedWeights.arrays, by parameter
    name) into this rank's shard: no communication, each rank reads only its rows."""
    reshard(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in arrays:
                raise KeyError(f"shared weights lack parameter {name!r}")
            local = p.to_local() if isinstance(p, DTensor) else p
            part = torch.from_numpy(np.array(local_slice(arrays[name], p), dtype=np.float32))
            if part.shape != local.shape:
                raise ValueError(f"{name}: shard {tuple(local.shape)} != slice {tuple(part.shape)}")
            local.copy_(part)


def reshard(model: torch.nn.Module) -> None:
    """Register the sharded parameters again: after a forward pass FSDP keeps the root's
    parameters whole (unsharded) until the next backward or forward."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's local shard (a view: writing to it writes the parameter)."""
    reshard(model)
    return {n: p.to_local() if isinstance(p, DTensor) else p for n, p in model.named_parameters()}


# --- Data parallel forward passes ---


class GatherRows(torch.autograd.Function):
    """All-gather the ranks' equal-sized row blocks (concatenated in rank order).

    Backward needs no communication: every rank computes the same loss from the gathered
    rows, so each takes its own block of that loss's gradient. Times N, because FSDP averages
    the ranks' gradients where the loss's gradient is their sum.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.world_size, ctx.rows = rank, world_size, local.size(0)
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        block = grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
        return block * ctx.world_size, None, None


def pad_rows(x: torch.Tensor, rows: int, filler: torch.Tensor) -> torch.Tensor:
    """x with copies of `filler` (one row) appended up to `rows` rows."""
    missing = rows - x.size(0)
    return x if missing == 0 else torch.cat([x, filler.expand(missing, *filler.shape[1:])])


class GangModel(torch.nn.Module):
    """The sharded model as the tasks see it: called with a whole batch, it runs this rank's
    share of the rows (padded to the same number on every rank, as FSDP's collectives need
    every rank in every forward) and returns the logits of all the rows, gathered.

    The loss is then the whole batch's on every rank, normalised exactly as in one process
    (unlearning.ascent_step and training.train_model run unchanged), and every rank sees the
    same loss value. Callers must compute the same loss on every rank (GatherRows' backward
    relies on it; the tasks do). Only the logits travel: rows x length x vocabulary floats
    per forward, which micro_batch_size bounds.
    """

    def __init__(self, sharded: torch.nn.Module, gang: Gang) -> None:
        super().__init__()
        self.sharded = sharded
        self.gang = gang

    @property
    def config(self) -> Any:
        return self.sharded.config

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The encoder-decoder models' decoder inputs (modeling.logits_and_labels uses it)."""
        return self.sharded.prepare_decoder_input_ids_from_labels(labels=labels)

    def forward(self, **inputs: Any) -> Any:
        n_rows = inputs["input_ids"].size(0)
        start, stop = row_share(n_rows, self.gang)
        per = math.ceil(n_rows / self.gang.world_size)
        local = {
            k: pad_rows(v[start:stop], per, v[:1]) if torch.is_tensor(v) and v.dim() > 0
            and v.size(0) == n_rows else v
            for k, v in inputs.items()
        }
        out = self.sharded(**local)
        out.logits = GatherRows.apply(out.logits, self.gang.rank, self.gang.world_size)[:n_rows]
        return out


# --- Evaluation: rows split across ranks, per-row losses gathered ---


def gather_rows(local: torch.Tensor, n_rows: int, gang: Gang) -> torch.Tensor:
    """Every rank's share (row_share) of a 1-D tensor, gathered in row order."""
    per = math.ceil(n_rows / gang.world_size)
    padded = torch.zeros(per, dtype=local.dtype, device=gang.device)
    padded[: local.numel()] = local.to(gang.device)
    parts = [torch.empty_like(padded) for _ in range(gang.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n_rows].cpu()


@torch.no_grad()
def sharded_row_losses(
    model: torch.nn.Module,
    data: TokenizedSet,
    indices: np.ndarray,
    batch_size: int,
    gang: Gang,
) -> tuple[float, np.ndarray]:
    """evaluation.row_losses over the gang: each rank evaluates its share of the rows (every
    rank runs the same number of batches, a dummy one when its share is used up) and the
    per-row loss sums and counts are gathered, so every rank returns the same."""
    was_training = model.training
    model.eval()
    start, stop = row_share(len(indices), gang)
    mine = indices[start:stop]
    n_batches = math.ceil(math.ceil(len(indices) / gang.world_size) / batch_size)
    sums, counts = [], []
    for b in range(n_batches):
        rows = mine[b * batch_size : (b + 1) * batch_size]
        s, c = token_losses(model, data.batch(rows if len(rows) else indices[:1], gang.device))
        if len(rows):
            sums.append(s.double())
            counts.append(c)
    model.train(was_training)
    empty = torch.zeros(0, device=gang.device)
    total = gather_rows(torch.cat(sums) if sums else empty.double(), len(indices), gang)
    count = gather_rows(torch.cat(counts) if counts else empty.long(), len(indices), gang)
    mean = float(total.sum() / max(int(count.sum()), 1))
    return mean, (total / count.clamp(min=1)).numpy()


# --- The bench ---


def check_sharded_task(task: Task) -> None:
    """Raise ValueError, before any collective, for a task a sharded bench cannot run: the
    gradient and EK-FAC tasks read whole gradients or copy the model, and transformers'
    Adafactor keeps plain-tensor state (its factored moments need sums across shards)."""
    if not isinstance(task, (EvalTask, UnlearnTask, LdoTask, SubsetTask)):
        raise ValueError(f"a sharded bench cannot run {type(task).__name__}s")
    if isinstance(task, UnlearnTask) and task.settings.optimizer not in SHARDED_OPTIMIZERS:
        raise ValueError(f"optimizer {task.settings.optimizer!r} cannot update sharded "
                         f"parameters; use one of {', '.join(SHARDED_OPTIMIZERS)}")


class ShardedWorkbench:
    """workbench.Workbench over a gang: one sharded model plus the datasets, able to run an
    EvalTask, UnlearnTask, LdoTask or SubsetTask from any shared weight set. Every rank builds
    one with the same arguments and runs the same tasks in the same order; all return the same.

    `model` is the GangModel (data parallel over the gang); its `sharded` module is the FSDP
    model. The pristine copy of the base weights is this rank's shards only. GradientTask,
    EkfacTask and Adafactor are refused (check_sharded_task).
    """

    def __init__(
        self,
        weights: Mapping[str, SharedWeights],
        datasets: dict[str, TokenizedSet],
        eval_indices: dict[str, np.ndarray],
        eval_batch_size: int,
        gang: Gang,
        *,
        precision: str = "fp32",
    ) -> None:
        self.gang = gang
        self.rank = gang.rank  # its own dropout masks for its rows (optim.seed_dropout)
        self.device = gang.device
        self.precision = check_precision(precision)
        self.weights = weights
        sharded = shard_model(weights[BASE].config, gang)
        load_shards(sharded, weights[BASE].arrays)
        self.model = GangModel(sharded, gang)
        self.model.eval()
        self.pristine = {n: t.detach().clone() for n, t in local_tensors(sharded).items()}
        self.datasets = datasets
        self.eval_indices = eval_indices
        self.eval_batch_size = eval_batch_size

    def reset(self, weights: str = BASE) -> None:
        """Load a shared weight set into the shards (the base set from this rank's copy)."""
        if weights == BASE:
            with torch.no_grad():
                for name, local in local_tensors(self.model.sharded).items():
                    local.copy_(self.pristine[name])
        else:
            load_shards(self.model.sharded, self.weights[weights].arrays)
        self.model.zero_grad(set_to_none=True)
        self.model.eval()

    def evaluate(
        self, names: tuple[str, ...], per_row: bool = False
    ) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
        """Mean loss on each named dataset's evaluation rows (and, with per_row, each row's),
        the rows split across the gang; the same on every rank."""
        means, rows = {}, {}
        for name in names:
            means[name], rows[name] = sharded_row_losses(
                self.model.sharded, self.datasets[name], self.eval_indices[name],
                self.eval_batch_size, self.gang,
            )
        return means, (rows if per_row else None)

    def run(self, task: Task) -> TaskResult:
        """Run one task on this rank (every rank must run the same one) in the bench's
        precision, and time it. ValueError for a task it cannot run (check_sharded_task)."""
        check_sharded_task(task)
        start = time.perf_counter()
        with precision_context(self.device, self.precision):
            out: Output = task.run(self)
        return TaskResult(task=task, losses=out.losses, seconds=time.perf_counter() - start,
                          row_losses=out.row_losses, payload=out.payload)

    def full_arrays(self) -> dict[str, np.ndarray]:
        """The whole current weights as float32 arrays, on every rank (a collective): to
        save a model, or to check the shards."""
        reshard(self.model.sharded)
        return {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().numpy()
            for n, p in self.model.sharded.named_parameters()
        }

    def local_bytes(self) -> int:
        """Bytes of this rank's parameter shards (float32): about 1/N of the model's."""
        return sum(t.numel() * t.element_size() for t in local_tensors(self.model.sharded).values())
