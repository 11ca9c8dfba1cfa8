"""Models: built from a config or loaded from a folder; weights as NumPy for the object store."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from untrac_ray.errors import ModelError, SpecError
from untrac_ray.tokenization import IGNORE_INDEX

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(path: str | Path) -> bool:
    """True when a folder holds Hugging Face weight files."""
    return any(Path(path, f).is_file() for f in WEIGHT_FILES)


def check_model_folder(path: str) -> None:
    """Raise ModelError unless `path` is a model folder with a config and weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"model.path: model folder not found: {path}")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model.path: {path} has no config.json")
    if not has_weights(folder):
        raise ModelError(
            f"model.path: {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )


def config_from_dict(config: dict[str, Any], vocab_size: int | None = None,
                     eos_id: int | None = None):
    """A transformers config from a mapping with a model_type (vocab size from the tokenizer)."""
    values = dict(config)
    model_type = values.pop("model_type")
    if vocab_size is not None:
        given = values.get("vocab_size")
        if given is not None and given < vocab_size:
            raise SpecError(
                f"model.config.vocab_size: {given} is smaller than the tokenizer's {vocab_size}"
            )
        values.setdefault("vocab_size", vocab_size)
    if eos_id is not None:
        values.setdefault("bos_token_id", eos_id)
        values.setdefault("eos_token_id", eos_id)
        values.setdefault("pad_token_id", eos_id)
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as err:
        raise SpecError(f"model.config: {err}".splitlines()[0]) from None


def build_model(config, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM for a config (seeded)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_model(path: str) -> PreTrainedModel:
    """A causal LM from a local folder, in float32."""
    check_model_folder(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, local_files_only=True
        )
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"model.path: cannot load a causal LM from {path}: {err}") from None


@dataclass
class SharedWeights:
    """A model's config and parameters as NumPy arrays: what goes into Ray's object store once."""

    config: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> SharedWeights:
        arrays = {
            name: p.detach().to("cpu", torch.float32).numpy().copy()
            for name, p in model.named_parameters()
        }
        return cls(config=model.config.to_dict(), arrays=arrays)

    def build(self, device: torch.device | str = "cpu") -> PreTrainedModel:
        """A model with these weights on `device`."""
        values = dict(self.config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        model = AutoModelForCausalLM.from_config(config)
        load_arrays(model, self.arrays)
        return model.to(device)


def load_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy (possibly read-only, shared) arrays into a model's parameters, in place."""
    params = dict(model.named_parameters())
    missing = set(params) - set(arrays)
    if missing:
        raise ModelError(f"shared weights lack parameters: {sorted(missing)[:5]}")
    with torch.no_grad(), warnings.catch_warnings():
        # Arrays from the object store are read-only; we only read them into our own tensors.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for name, p in params.items():
            p.copy_(torch.as_tensor(arrays[name]))


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Per row: the sum of next-token cross-entropies over labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Sum of next-token cross-entropies over labelled tokens, and how many there were."""
    sums, counts = token_losses(model, batch)
    return sums.sum(), int(counts.sum())
