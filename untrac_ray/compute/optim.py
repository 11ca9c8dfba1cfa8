"""The loop parts that training and unlearning share: the optimizer a spec names, and the
seeded order in which a set's rows are drawn, batch after batch, epoch after epoch.

Parameters kept in bfloat16 (resources.weights_dtype: bf16) are stepped through
`StochasticRounding`: an update below half a bf16 unit in the last place would otherwise be
rounded away (a weight of 0.02 has a unit of 1.2e-4; Adam at the default learning rate 5e-5
moves it by about 5e-5 a step, so with round-to-nearest it never moves at all).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def seed_dropout(seed: int, rank: int = 0) -> None:
    """Seed torch's generator, which draws the model's dropout masks, for one process of a
    loop: the seed itself for a single process (rank 0), an independent stream derived from
    (seed, rank) for each other rank of a gang. Each rank of a sharded run takes its own rows
    of every batch: with one seed for all, every rank would drop the same units for its rows,
    masks that a single process draws independently for each row."""
    if rank:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(seed)


def make_optimizer(
    name: str, params, learning_rate: float, weight_decay: float = 0.0, seed: int = 0
) -> torch.optim.Optimizer:
    """adam / adamw / sgd from torch, adafactor from transformers (constant learning rate);
    bfloat16 parameters are stepped in float32 and rounded back stochastically (seeded)."""
    params = [p for p in params if p.requires_grad]
    inner = _optimizer(name, params, learning_rate, weight_decay)
    if any(p.dtype == torch.bfloat16 for p in params):
        return StochasticRounding(inner, seed)
    return inner


def _optimizer(name: str, params: list[torch.Tensor], learning_rate: float,
               weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=learning_rate, scale_parameter=False, relative_step=False,
            warmup_init=False, weight_decay=weight_decay,
        )
    raise ValueError(f"unknown optimizer {name!r}")


def batch_schedule(
    n_rows: int, batch_size: int, total_steps: int, seed: int
) -> Iterator[np.ndarray]:
    """Row indices of each step: seeded shuffles of the rows, epoch after epoch."""
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        order = rng.permutation(n_rows)
        for start in range(0, n_rows, batch_size):
            if step == total_steps:
                return
            yield order[start : start + batch_size]
            step += 1


# The optimizer states that have one value per weight (torch's Adam, AdamW and SGD with
# momentum): kept in bfloat16 beside bfloat16 weights, rounded stochastically like them.
# Adafactor's factored moments are small and stay float32 (compute/memory.py counts them so).
ELEMENTWISE_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def round_stochastically(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 `x` rounded to bfloat16 up or down at random, with the probability of each
    in proportion to how close x lies to it: unbiased, so that updates far below a bf16 unit
    add up over steps as they do in float32, where round-to-nearest drops every one of them.

    bfloat16 is the top 16 bits of a float32: adding 16 random low bits to the bit pattern and
    cutting them off rounds the magnitude up with probability (low bits) / 2^16."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device,
                          dtype=torch.int32)
    rounded = ((x.view(torch.int32) + noise) & -(1 << 16)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class StochasticRounding(torch.optim.Optimizer):
    """An optimizer (`inner`) stepped on bfloat16 parameters without losing small updates.

    Each step takes one parameter at a time: a float32 copy of its weights, gradient and
    per-weight state, one step of `inner` on it, and the results rounded back into bfloat16
    stochastically (round_stochastically). Nothing float32 stays between steps, so the
    memory is that of bf16 weights, gradients and state (the point of weights_dtype: bf16),
    plus, during a step, float32 copies of the largest parameter (compute/memory.py). A
    float32 master copy would keep small updates too, but costs as much memory as float32
    weights; Kahan-compensated weights would cost a third more.

    `param_groups` and `state` are the inner optimizer's own (a learning-rate scheduler sets
    the rate it steps with). The rounding is seeded: the same task gives the same numbers.
    """

    def __init__(self, inner: torch.optim.Optimizer, seed: int) -> None:
        super().__init__([p for g in inner.param_groups for p in g["params"]], inner.defaults)
        self.inner = inner
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        if closure is not None:
            raise ValueError("StochasticRounding steps without a closure")
        groups = self.inner.param_groups
        saved = [group["params"] for group in groups]
        try:
            for group, params in zip(groups, saved, strict=True):
                for p in params:
                    if p.grad is not None:
                        self._step_one(groups, group, p)
        finally:
            for group, params in zip(groups, saved, strict=True):
                group["params"] = params

    def _step_one(self, groups: list[dict], group: dict, p: torch.Tensor) -> None:
        """One step of the inner optimizer on parameter `p` alone."""
        for other in groups:
            other["params"] = []
        if p.dtype != torch.bfloat16:
            group["params"] = [p]
            self.inner.step()
            return
        exact = p.detach().float()
        exact.grad = p.grad.float()
        state = self.inner.state.pop(p, None)
        if state:
            self.inner.state[exact] = {
                k: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v
                for k, v in state.items()}
        group["params"] = [exact]
        self.inner.step()
        generator = self._generator(p.device)
        p.copy_(round_stochastically(exact, generator))
        self.inner.state[p] = {
            k: round_stochastically(v, generator) if k in ELEMENTWISE_STATE
            and torch.is_tensor(v) and v.dtype == torch.float32 else v
            for k, v in self.inner.state.pop(exact, {}).items()}
