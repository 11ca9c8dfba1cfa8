"""The unlearning loop: gradient ascent on one dataset, with a callback at evaluation steps.

`unlearn` is the loop; `ascent_step` one step of it: the ascent (the paper's, or NPO's
weighted one, `Npo`) and, when the spec asks for them, the terms on the kept sets (`Retain`:
their loss, and the KL divergence from the base model). The optimizers and batch orders it
shares with training are optim.py's.

NPO and the KL term compare the model with the base model: a frozen copy of its weights
taken before the first step (`frozen_base`). The copy runs as the ascending model does, in
train mode, and each of its forwards draws the dropout masks the model's forward on the same
batch then draws (`base_forward`: it replays torch's generator state), so at step one NPO's
log-ratio and the KL term are exactly 0 with dropout on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from untrac_ray.compute.modeling import (
    label_count,
    logits_and_labels,
    row_cross_entropy,
    token_losses,
)
from untrac_ray.compute.optim import batch_schedule, make_optimizer, seed_dropout
from untrac_ray.inputs.errors import NonFiniteLossError
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.inputs.tokenization import IGNORE_INDEX, TokenizedSet


class Retain:
    """The kept sets an ascent step also trains on (the retain term and the KL term), and how
    much.

    Each step draws `batch_size` rows uniformly from all kept sets together, from its own
    seeded stream (the unlearned set's batch order is the same with or without it). On that
    batch the step lowers `weight` x their mean token loss and `kl_weight` x the mean over
    their tokens of KL(base model || model), the base model being `reference` (frozen_base,
    run with the masks of the model's forward on the same batch: base_forward)."""

    def __init__(self, sets: list[TokenizedSet], weight: float, batch_size: int,
                 seed: int, kl_weight: float = 0.0,
                 reference: torch.nn.Module | None = None) -> None:
        self.sets, self.weight, self.batch_size = sets, weight, batch_size
        self.kl_weight, self.reference = kl_weight, reference
        if kl_weight > 0 and reference is None:
            raise ValueError("the KL term needs the base model (reference)")
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


class Npo:
    """Negative preference optimization (arXiv 2404.05868). NPO minimizes
    (2/beta) * mean over rows of log(1 + (p(row) / p_base(row))^beta), p a row's likelihood
    (its summed token loss l: p = exp(-l)); its gradient is gradient ascent on each row's
    summed loss weighted by w = 2 * sigmoid(-beta * (l - l_base)): 1 at the base model, and
    falling toward 0 as the row is forgotten, so the ascent slows instead of diverging.

    The step descends sum over rows of NPO's row loss / tokens: NPO's gradient scaled by
    rows / tokens, so that at the first step (and for beta -> 0) it is exactly the paper's
    ascent on the mean token loss, at the same learning rate. l_base: each row's summed loss
    under `reference` (the base model, frozen_base), computed with the step's own dropout
    masks (base_forward)."""

    def __init__(self, beta: float, reference: torch.nn.Module) -> None:
        self.beta, self.reference = beta, reference

    def base_sums(self, batch: dict[str, torch.Tensor],
                  device: torch.device | str) -> torch.Tensor:
        """Each row's summed loss under the base model, with the masks that the model's next
        forward draws (call it just before that forward)."""
        return row_cross_entropy(*base_forward(self.reference, batch, device))[0]


def npo_row_losses(sums: torch.Tensor, base_sums: torch.Tensor, beta: float) -> torch.Tensor:
    """(2/beta) * log(1 + (p / p_base)^beta) for each row, from the rows' summed token losses
    under the model (`sums`, with their gradient) and the base model: (2/beta) log 2 at the
    base model."""
    log_ratio = base_sums.detach().float() - sums.float()  # log p - log p_base
    return (2 / beta) * torch.nn.functional.softplus(beta * log_ratio)


def frozen_base(model: torch.nn.Module) -> torch.nn.Module:
    """The base model beside `model` for NPO and the KL term: a frozen copy of its weights (a
    second copy in memory: compute/memory.py counts it), in train mode like the ascending
    model (its dropout on), without gradient checkpointing (it never runs a backward pass)."""
    reference = copy.deepcopy(model).train().requires_grad_(False)
    if getattr(reference, "is_gradient_checkpointing", False):
        reference.gradient_checkpointing_disable()
    return reference


def base_forward(reference: torch.nn.Module, batch: dict[str, torch.Tensor],
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's logits and labels on `batch` (no gradient), drawing the dropout masks
    that the model's next forward draws: torch's generator is put back as it was, so the
    model's forward on the same batch then draws the same ones, and its stream of masks is
    that of a run without the base model."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda") else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        return logits_and_labels(reference, batch)


def _micro_batches(parts: list[tuple[TokenizedSet, np.ndarray]], micro_batch_size: int | None,
                   device: torch.device | str) -> tuple[list[tuple], int]:
    """The micro-batches of `parts` as (rows, batch), and how many tokens they have in all."""
    batches = []
    for data, rows in parts:
        micro = micro_batch_size or len(rows)
        batches += [(rows[i : i + micro], data.batch(rows[i : i + micro], device))
                    for i in range(0, len(rows), micro)]
    return batches, max(sum(label_count(b) for _, b in batches), 1)


def _backward_forget(model: torch.nn.Module, data: TokenizedSet, rows: np.ndarray,
                     micro_batch_size: int | None, device: torch.device | str,
                     npo: Npo | None = None) -> float:
    """Backpropagate minus the mean token loss of `rows` (with `npo`: instead, the sum of
    NPO's row losses over the tokens), in micro-batches; returns that mean token loss."""
    batches, n_tokens = _micro_batches([(data, rows)], micro_batch_size, device)
    total = 0.0
    for _, batch in batches:
        base = npo.base_sums(batch, device) if npo is not None else None
        sums, _ = token_losses(model, batch)
        loss = -sums.sum() if npo is None else npo_row_losses(sums, base, npo.beta).sum()
        (loss / n_tokens).backward()
        total += float(sums.detach().sum())
    return total / n_tokens


def kl_from_reference(logits: torch.Tensor, reference_logits: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """The sum over labelled tokens of KL(reference || model) between next-token
    distributions (float32)."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    mine = torch.log_softmax(logits.float(), dim=-1)
    per_token = (ref.exp() * (ref - mine)).sum(dim=-1)
    return per_token[labels != IGNORE_INDEX].sum()


def _backward_kept(model: torch.nn.Module, retain: Retain, micro_batch_size: int | None,
                   device: torch.device | str) -> None:
    """Backpropagate the kept terms on the next retain batch: weight x their mean token loss
    plus kl_weight x their mean KL from the base model."""
    batches, n_tokens = _micro_batches(retain.draw(), micro_batch_size, device)
    for _, batch in batches:
        if retain.kl_weight > 0:  # before the model's forward: the same dropout masks
            reference_logits, _ = base_forward(retain.reference, batch, device)
        logits, labels = logits_and_labels(model, batch)
        loss = logits.new_zeros((), dtype=torch.float32)
        if retain.weight > 0:
            loss = loss + retain.weight * row_cross_entropy(logits, labels)[0].sum()
        if retain.kl_weight > 0:
            loss = loss + retain.kl_weight * kl_from_reference(logits, reference_logits, labels)
        (loss / n_tokens).backward()


def ascent_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TokenizedSet,
    rows: np.ndarray,
    micro_batch_size: int | None,
    max_grad_norm: float | None,
    device: torch.device | str,
    retain: Retain | None = None,
    npo: Npo | None = None,
) -> float:
    """One optimizer step that *raises* the mean token loss of `rows` (NPO-weighted with
    `npo`) and, with `retain`, lowers the kept terms on a batch of the kept sets; returns the
    raised loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = _backward_forget(model, data, rows, micro_batch_size, device, npo)
    if retain is not None and (retain.weight > 0 or retain.kl_weight > 0):
        _backward_kept(model, retain, micro_batch_size, device)
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

    With `retain` (the kept sets) and settings.retain_weight or kl_weight, each step also
    trains on a batch of them (Retain); settings.objective npo weighs the ascent (Npo). With
    `stop`, the run ends after the first step for which stop(step) is true, which is then
    evaluated (the stopping rule by loss rise). `rank`: this process's rank in a gang (its
    dropout masks are its own: optim.seed_dropout). Raises NonFiniteLossError naming the
    dataset and step when the loss stops being finite.
    """
    seed_dropout(settings.seed, rank)
    total = settings.total_steps(len(data))
    eval_steps = set(eval_steps)
    optimizer = make_optimizer(settings.optimizer, model.parameters(), settings.learning_rate,
                               seed=settings.seed)
    kept = None
    kl = bool(retain) and settings.kl_weight > 0
    # the base model, frozen: one second copy of the weights for NPO and the KL term
    reference = frozen_base(model) if kl or settings.objective == "npo" else None
    if retain and (settings.retain_weight > 0 or settings.kl_weight > 0):
        kept = Retain(retain, settings.retain_weight,
                      settings.retain_batch_size or settings.batch_size, settings.seed,
                      settings.kl_weight, reference)
    npo = Npo(settings.npo_beta, reference) if settings.objective == "npo" else None
    model.train()
    schedule = batch_schedule(len(data), settings.batch_size, total, settings.seed)
    step = 0
    for step, rows in enumerate(schedule, start=1):
        loss = ascent_step(model, optimizer, data, rows, settings.micro_batch_size,
                           settings.max_grad_norm, device, kept, npo)
        check_ascent_loss(loss, data.name, step)
        if step in eval_steps:
            on_eval(step)
        elif stop is not None and stop(step):
            on_eval(step)
            break
    model.eval()
    return step
