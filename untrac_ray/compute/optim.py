"""The loop parts that training and unlearning share: the optimizer a spec names, and the
seeded order in which a set's rows are drawn, batch after batch, epoch after epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def make_optimizer(
    name: str, params, learning_rate: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """adam / adamw / sgd from torch, adafactor from transformers (constant learning rate)."""
    params = [p for p in params if p.requires_grad]
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
