"""The model a job names, read without loading it (no torch): a Hugging Face model folder (its
config.json and weight files), and which kind of model a config describes: a causal LM, or an
encoder-decoder (T5) that reads the prompt and predicts the target, which text rows cannot
feed. compute/modeling.py builds and loads models; preflight.py checks a job's model with
these before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from untrac_ray.inputs.errors import ModelError

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


def folder_config(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a mapping ({} when it cannot be read)."""
    try:
        config = json.loads(Path(path, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def vocab_size(config: dict[str, Any]) -> int | None:
    """The number of token ids a model embeds, from its config (a multimodal model's text
    part included); None when the config does not say."""
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    return int(size) if isinstance(size, int) else None


def is_encoder_decoder(config: Any) -> bool:
    """True for an encoder-decoder config (T5, BART...): a transformers config, or a mapping
    with a model_type (a spec's model.config, a folder's config.json). For a mapping that does
    not say, transformers is asked about its model_type (imported here, only then)."""
    if not isinstance(config, dict):
        return bool(getattr(config, "is_encoder_decoder", False))
    if "is_encoder_decoder" in config:
        return bool(config["is_encoder_decoder"])
    from transformers import AutoConfig

    try:
        return bool(AutoConfig.for_model(config["model_type"]).is_encoder_decoder)
    except Exception:  # noqa: BLE001 - an unknown model_type is reported when the model is built
        return False


def folder_is_encoder_decoder(path: str | Path) -> bool:
    """True when a model folder's config.json describes an encoder-decoder model."""
    config = folder_config(path)
    return "model_type" in config and is_encoder_decoder(config)


def encoder_decoder_refusal(where: str, name: str) -> str:
    """The one line that refuses a text dataset for an encoder-decoder model."""
    return (f"{where}: dataset {name!r} is text, but an encoder-decoder model (model_type "
            "t5...) needs prompt_target rows (text blocks have no prompt/target split)")
