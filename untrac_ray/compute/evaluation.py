"""Evaluation: the mean token-level loss of a model on (a sample of) a dataset."""

from __future__ import annotations

import numpy as np
import torch

from untrac_ray.compute.modeling import token_losses
from untrac_ray.inputs.tokenization import TokenizedSet


def sample_indices(n_rows: int, max_examples: int | None, seed: int) -> np.ndarray:
    """The rows evaluated: all of them, or a seeded sample of max_examples (sorted)."""
    if max_examples is None or n_rows <= max_examples:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=max_examples, replace=False))


@torch.no_grad()
def row_losses(
    model: torch.nn.Module,
    data: TokenizedSet,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> tuple[float, np.ndarray]:
    """The mean loss over all labelled tokens of the rows `indices` (not a mean of batches),
    and each row's own mean token loss."""
    was_training = model.training
    model.eval()
    sums, counts = [], []
    for start in range(0, len(indices), batch_size):
        s, c = token_losses(model, data.batch(indices[start : start + batch_size], device))
        sums.append(s.double().cpu())
        counts.append(c.cpu())
    model.train(was_training)
    total, count = torch.cat(sums), torch.cat(counts)
    mean = float(total.sum() / max(int(count.sum()), 1))
    return mean, (total / count.clamp(min=1)).numpy()


def mean_loss(
    model: torch.nn.Module,
    data: TokenizedSet,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> float:
    """Mean cross-entropy over all labelled tokens of the rows `indices`."""
    return row_losses(model, data, indices, batch_size, device)[0]
