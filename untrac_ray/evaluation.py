"""Evaluation: the mean token-level loss of a model on (a sample of) a dataset."""

from __future__ import annotations

import numpy as np
import torch

from untrac_ray.modeling import token_loss_sum
from untrac_ray.tokenization import TokenizedSet


def sample_indices(n_rows: int, max_examples: int | None, seed: int) -> np.ndarray:
    """The rows evaluated: all of them, or a seeded sample of max_examples (sorted)."""
    if max_examples is None or n_rows <= max_examples:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=max_examples, replace=False))


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    data: TokenizedSet,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> float:
    """Mean cross-entropy over all labelled tokens of the rows `indices` (not a mean of batches)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(indices), batch_size):
        loss, n = token_loss_sum(model, data.batch(indices[start : start + batch_size], device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)
