"""Training the base model on the job's training datasets (a loop you can read in one sitting)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from untrac_ray.errors import NonFiniteLossError
from untrac_ray.modeling import (
    build_model,
    config_from_dict,
    has_weights,
    load_model,
    token_loss_sum,
)
from untrac_ray.spec import JobSpec, TrainingSpec
from untrac_ray.tokenization import TokenizedSet
from untrac_ray.unlearning import batch_schedule, make_optimizer

TRAIN_RECORD = "untrac_train.json"


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(
    model: PreTrainedModel,
    sets: list[TokenizedSet],
    cfg: TrainingSpec,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train on the union of `sets` (rows shuffled together); returns the loss of every step."""
    torch.manual_seed(cfg.seed)
    sizes = [len(s) for s in sets]
    owners = np.repeat(np.arange(len(sets)), sizes)  # global row -> set
    local = np.concatenate([np.arange(n) for n in sizes])  # global row -> row in its set
    n_rows = int(sum(sizes))
    total = cfg.max_steps or cfg.epochs * math.ceil(n_rows / cfg.batch_size)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate,
                               cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total, cfg.warmup_steps)
    )
    model.train()
    losses: list[float] = []
    for step, rows in enumerate(batch_schedule(n_rows, cfg.batch_size, total, cfg.seed), 1):
        optimizer.zero_grad(set_to_none=True)
        parts = [(sets[k], local[rows[owners[rows] == k]]) for k in np.unique(owners[rows])]
        batches = [data.batch(idx) for data, idx in parts]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total_loss = 0.0
        for batch in batches:
            loss_sum, _ = token_loss_sum(model, batch)
            (loss_sum / max(n_tokens, 1)).backward()
            total_loss += float(loss_sum.detach())
        loss = total_loss / max(n_tokens, 1)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss} at step {step}")
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss)
        if on_step is not None:
            on_step(step, total, loss)
    model.eval()
    return losses


def trained_model_dir(spec: JobSpec) -> Path:
    """Where `train` saves this spec's model: training.output_dir, else the cache by spec hash."""
    if spec.training.output_dir:
        return Path(spec.training.output_dir)
    return Path(spec.cache_dir, "models", f"{spec.name}-{spec.model_key()}")


def find_trained_model(spec: JobSpec) -> Path | None:
    """The folder of a model trained earlier for the same model, tokenizer and data, if any."""
    folder = trained_model_dir(spec)
    record = folder / TRAIN_RECORD
    if has_weights(folder) and record.is_file():
        if json.loads(record.read_text()).get("model_key") == spec.model_key():
            return folder
    return None


def train_base_model(
    spec: JobSpec,
    tokenizer: PreTrainedTokenizerBase,
    train_sets: list[TokenizedSet],
    on_step: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Train the job's model (from its config, or continue from its folder) and save it."""
    if spec.model.config is not None:
        config = config_from_dict(spec.model.config, len(tokenizer), tokenizer.eos_token_id)
        model = build_model(config, seed=spec.training.seed)
    else:
        model = load_model(spec.model.path)
    start = time.perf_counter()
    losses = train_model(model, train_sets, spec.training, on_step)
    folder = trained_model_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {
        "model_key": spec.model_key(),
        "job": spec.name,
        "steps": len(losses),
        "final_loss": float(np.mean(losses[-10:])),
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (folder / TRAIN_RECORD).write_text(json.dumps(record, indent=2))
    return folder
