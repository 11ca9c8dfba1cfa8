"""The unlearning loop: gradient ascent on one dataset, with a callback at evaluation steps.

`unlearn` is the loop; `ascent_step` one step of it (with the retain term, `Retain`, when the
spec asks for one). The optimizers and batch orders it shares with training are optim.py's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from untrac_ray.compute.modeling import label_count, token_loss_sum
from untrac_ray.compute.optim import batch_schedule, make_optimizer, seed_dropout
from untrac_ray.inputs.errors import NonFiniteLossError
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.inputs.tokenization import TokenizedSet


class Retain:
    """The kept sets an ascent step also descends on (the retain term), and how much.

    Each step draws `batch_size` rows uniformly from all kept sets together, from its own
    seeded stream (the unlearned set's batch order is the same with or without it)."""

    def __init__(self, sets: list[TokenizedSet], weight: float, batch_size: int,
                 seed: int) -> None:
        self.sets, self.weight, self.batch_size = sets, weight, batch_size
        self.offsets = np.cumsum([0, *(len(s) for s in sets)])
        self.rng = np.random.default_rng([seed, 1])

    def draw(self) -> list[tuple[TokenizedSet, np.ndarray]]:
        """The next retain batch, as rows of each kept set."""
        total = int(self.offsets[-1])
        picks = np.sort(self.rng.choice(total, size=min(self.batch_size, total), replace=False))
        out = []
        for i, data in enumerate(self.sets):
            rows = picks[(picks >= self.offsets[i]) & (picks < self.offsets[i + 1])]
            if len(rows):
                out.append((data, rows - self.offsets[i]))
        return out


def _backward_mean_loss(model: torch.nn.Module, parts: list[tuple[TokenizedSet, np.ndarray]],
                        micro_batch_size: int | None, scale: float,
                        device: torch.device | str) -> float:
    """Backpropagate `scale` x the mean token loss over all rows of `parts` (in micro-batches);
    returns that mean loss."""
    batches = []
    for data, rows in parts:
        micro = micro_batch_size or len(rows)
        batches += [data.batch(rows[i : i + micro], device) for i in range(0, len(rows), micro)]
    n_tokens = max(sum(label_count(b) for b in batches), 1)
    total = 0.0
    for batch in batches:
        loss_sum, _ = token_loss_sum(model, batch)
        (scale * loss_sum / n_tokens).backward()
        total += float(loss_sum.detach())
    return total / n_tokens


def ascent_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TokenizedSet,
    rows: np.ndarray,
    micro_batch_size: int | None,
    max_grad_norm: float | None,
    device: torch.device | str,
    retain: Retain | None = None,
) -> float:
    """One optimizer step that *raises* the mean token loss of `rows` (and, with `retain`,
    lowers that of a batch of the kept sets, weighted); returns the raised loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = _backward_mean_loss(model, [(data, rows)], micro_batch_size, -1.0, device)
    if retain is not None and retain.weight > 0:
        _backward_mean_loss(model, retain.draw(), micro_batch_size, retain.weight, device)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss


def check_ascent_loss(loss: float, forget: str, step: int) -> None:
    """Raise NonFiniteLossError naming the dataset and step when an ascent loss is not finite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss} while unlearning dataset {forget!r} at step {step}; "
            "lower the learning rate or set max_grad_norm"
        )


def check_eval_losses(losses: dict[str, float], forget: str, step: int) -> None:
    """Raise NonFiniteLossError naming the evaluated sets whose loss is not finite."""
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteLossError(
            f"loss on {', '.join(bad)} became non-finite while unlearning dataset "
            f"{forget!r} at step {step}; lower the learning rate or set max_grad_norm"
        )


def unlearn(
    model: torch.nn.Module,
    data: TokenizedSet,
    settings: UnlearnSpec,
    eval_steps: Iterable[int],
    on_eval: Callable[[int], None],
    device: torch.device | str = "cpu",
    retain: list[TokenizedSet] | None = None,
    stop: Callable[[int], bool] | None = None,
    rank: int = 0,
) -> int:
    """Gradient ascent on `data` for the settings' steps; calls on_eval(step) after each step
    in eval_steps (from schedule.eval_schedules). Returns the last step taken.

    With `retain` (the kept sets) and settings.retain_weight, each step also descends on a
    batch of them. With `stop`, the run ends after the first step for which stop(step) is
    true, which is then evaluated (the stopping rule by loss rise). `rank`: this process's
    rank in a gang (its dropout masks are its own: optim.seed_dropout).
    Raises NonFiniteLossError naming the dataset and step when the loss stops being finite.
    """
    seed_dropout(settings.seed, rank)
    total = settings.total_steps(len(data))
    eval_steps = set(eval_steps)
    optimizer = make_optimizer(settings.optimizer, model.parameters(), settings.learning_rate,
                               seed=settings.seed)
    kept = None
    if retain and settings.retain_weight > 0:
        kept = Retain(retain, settings.retain_weight,
                      settings.retain_batch_size or settings.batch_size, settings.seed)
    model.train()
    schedule = batch_schedule(len(data), settings.batch_size, total, settings.seed)
    step = 0
    for step, rows in enumerate(schedule, start=1):
        loss = ascent_step(model, optimizer, data, rows, settings.micro_batch_size,
                           settings.max_grad_norm, device, kept)
        check_ascent_loss(loss, data.name, step)
        if step in eval_steps:
            on_eval(step)
        elif stop is not None and stop(step):
            on_eval(step)
            break
    model.eval()
    return step
