"""Training the base model on the job's training datasets (a loop you can read in one sitting)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from untrac_ray.compute.modeling import (
    build_model,
    config_from_dict,
    label_count,
    load_model,
    token_loss_sum,
)
from untrac_ray.compute.optim import batch_schedule, make_optimizer, seed_dropout
from untrac_ray.inputs.errors import NonFiniteLossError
from untrac_ray.inputs.fingerprints import model_key, pretrain_key
from untrac_ray.inputs.hub import model_folder
from untrac_ray.inputs.model_folder import has_weights
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import TrainingSpec
from untrac_ray.inputs.tokenization import TokenizedSet

TRAIN_RECORD = "untrac_train.json"


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def total_training_steps(sets: list[TokenizedSet], cfg: TrainingSpec) -> int:
    """Optimizer steps of a training run over `sets`: max_steps, else epochs over all rows."""
    return cfg.total_steps(sum(len(s) for s in sets))


def train_model(
    model: PreTrainedModel,
    sets: list[TokenizedSet],
    cfg: TrainingSpec,
    on_step: Callable[[int, int, float, int], None] | None = None,
    device: torch.device | str = "cpu",
    on_checkpoint: Callable[[int, float], None] | None = None,
    rank: int = 0,
) -> list[float]:
    """Train on the union of `sets` (rows shuffled together); returns the loss of every step.
    on_step(step, total, loss, tokens) hears of each step (tokens: those the loss counted).
    `rank`: this process's rank in a gang (its own dropout masks: optim.seed_dropout).

    on_checkpoint(step, learning_rate) is called after each of cfg's checkpoint steps, with the
    learning rate that step used (TracIn weighs checkpoints by it).
    """
    seed_dropout(cfg.seed, rank)
    sizes = [len(s) for s in sets]
    owners = np.repeat(np.arange(len(sets)), sizes)  # global row -> set
    local = np.concatenate([np.arange(n) for n in sizes])  # global row -> row in its set
    n_rows = int(sum(sizes))
    total = total_training_steps(sets, cfg)
    checkpoints = set(cfg.checkpoint_steps(total)) if on_checkpoint else set()
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate,
                               cfg.weight_decay, seed=cfg.seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total, cfg.warmup_steps)
    )
    model.train()
    losses: list[float] = []
    for step, rows in enumerate(batch_schedule(n_rows, cfg.batch_size, total, cfg.seed), 1):
        optimizer.zero_grad(set_to_none=True)
        parts = [(sets[k], local[rows[owners[rows] == k]]) for k in np.unique(owners[rows])]
        batches = [data.batch(idx, device) for data, idx in parts]
        n_tokens = sum(label_count(b) for b in batches)
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
        used_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        losses.append(loss)
        if step in checkpoints:
            on_checkpoint(step, used_lr)
        if on_step is not None:
            on_step(step, total, loss, n_tokens)
    model.eval()
    return losses


def trained_model_dir(spec: JobSpec) -> Path:
    """Where `train` saves this spec's model: training.output_dir, else the cache by spec hash."""
    if spec.training.output_dir:
        return Path(spec.training.output_dir)
    return Path(spec.cache_dir, "models", f"{spec.name}-{model_key(spec)}")


def find_trained_model(spec: JobSpec) -> Path | None:
    """The folder of a model trained earlier for the same model, tokenizer and data, if any."""
    folder = trained_model_dir(spec)
    record = folder / TRAIN_RECORD
    if has_weights(folder) and record.is_file():
        if json.loads(record.read_text(encoding="utf-8")).get("model_key") == model_key(spec):
            return folder
    return None


def pretrained_dir(spec: JobSpec) -> Path:
    """Where the general pretraining stage's model is cached."""
    return Path(spec.cache_dir, "pretrained", f"{spec.name}-{pretrain_key(spec)}")


def ensure_pretrained(
    spec: JobSpec,
    tokenizer: PreTrainedTokenizerBase,
    on_step: Callable[[int, int, float, int], None] | None = None,
) -> Path:
    """The model after the spec's pretraining stage: trained once, then reused from the cache."""
    from untrac_ray.inputs.token_store import tokenized_dataset

    assert spec.pretraining is not None
    folder = pretrained_dir(spec)
    record = folder / TRAIN_RECORD
    if has_weights(folder) and record.is_file():
        if json.loads(record.read_text(encoding="utf-8")).get("model_key") == pretrain_key(spec):
            return folder
    sets = [
        tokenized_dataset(ds, tokenizer, spec.tokenizer, spec.cache_dir).open(
            tokenizer.pad_token_id)
        for ds in spec.pretraining.data
    ]
    config = config_from_dict(spec.model.config, len(tokenizer), tokenizer.eos_token_id)
    model = build_model(config, seed=spec.pretraining.training.seed)
    _train_and_save(model, sets, spec.pretraining.training, folder, tokenizer,
                    pretrain_key(spec), spec.name, on_step)
    return folder


def initial_model(
    spec: JobSpec,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    on_step: Callable[[int, int, float, int], None] | None = None,
) -> PreTrainedModel:
    """The weights training starts from: the pretrained stage, the model folder (finetune), or
    a fresh initialisation from the config with `seed`. Leave-dataset-out starts from here too."""
    if spec.pretraining is not None:
        return load_model(str(ensure_pretrained(spec, tokenizer, on_step)))
    if spec.model.config is None:
        return load_model(model_folder(spec.model))
    config = config_from_dict(spec.model.config, len(tokenizer), tokenizer.eos_token_id)
    return build_model(config, seed=seed)


def driver_device(environ: Mapping[str, str] | None = None,
                  cuda_available: bool | None = None) -> str:
    """Where the driver trains: a GPU only when this process may use one.

    In a submitted Ray job (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR) that is a GPU Ray gave it
    (`submit --entrypoint-gpus 1`: Ray sets CUDA_VISIBLE_DEVICES to it); a job given none
    sees every GPU of its node, which the actors hold, so it trains on the CPU. Elsewhere
    (an embedded local Ray, a driver started by hand) the machine's GPU, if there is one."""
    env = os.environ if environ is None else environ
    if not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        return "cpu"
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in env:
        return "cuda" if env.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1") else "cpu"
    return "cuda"


def _train_and_save(
    model: PreTrainedModel,
    sets: list[TokenizedSet],
    cfg: TrainingSpec,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    key: str,
    job: str,
    on_step: Callable[[int, int, float, int], None] | None,
) -> dict:
    """Train, save the model, its tokenizer, its checkpoints and a record of the run."""
    start = time.perf_counter()
    checkpoints: list[dict] = []

    def keep(step: int, lr: float) -> None:
        path = folder / "checkpoints" / f"step-{step}"
        model.save_pretrained(path)
        checkpoints.append({"step": step, "learning_rate": lr, "path": str(path)})

    # On a GPU when there is one (a submitted job's driver given --entrypoint-gpus); else CPU.
    device = driver_device()
    losses = train_model(model.to(device), sets, cfg, on_step, device=device,
                         on_checkpoint=keep)
    model.to("cpu")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {
        "model_key": key,
        "job": job,
        "steps": len(losses),
        "final_loss": float(np.mean(losses[-10:])),
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoints": checkpoints,
    }
    (folder / TRAIN_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def read_train_record(folder: str | Path) -> dict:
    """What `train` recorded about a model folder (steps, loss, checkpoints), or {}."""
    record = Path(folder, TRAIN_RECORD)
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}


def train_base_model(
    spec: JobSpec,
    tokenizer: PreTrainedTokenizerBase,
    train_sets: list[TokenizedSet],
    on_step: Callable[[int, int, float, int], None] | None = None,
) -> Path:
    """Train the job's model on its training sets from its initial weights, and save it."""
    model = initial_model(spec, tokenizer, spec.training.seed, on_step)
    folder = trained_model_dir(spec)
    _train_and_save(model, train_sets, spec.training, folder, tokenizer, model_key(spec),
                    spec.name, on_step)
    return folder
