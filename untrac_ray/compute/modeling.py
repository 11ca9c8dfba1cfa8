"""Models: built from a config or loaded from a folder; weights as NumPy for the object store."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from untrac_ray.inputs.errors import ModelError, SpecError
from untrac_ray.inputs.model_folder import check_model_folder, is_encoder_decoder
from untrac_ray.inputs.tokenization import IGNORE_INDEX


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
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as err:
        raise SpecError(f"model.config: {err}".splitlines()[0]) from None
    if config.is_encoder_decoder and "decoder_start_token_id" not in values:
        # T5's default start id 0 is a byte of the byte tokenizer: start from the pad id instead.
        config.decoder_start_token_id = config.pad_token_id
    return config


def auto_class(config: Any) -> type:
    """The Auto class of a config: seq2seq for encoder-decoder models, else causal LM."""
    return AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM


def build_model(config, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal or encoder-decoder LM for a config (seeded)."""
    torch.manual_seed(seed)
    return auto_class(config).from_config(config)


def load_model(path: str) -> PreTrainedModel:
    """A causal or encoder-decoder LM from a local folder, in float32."""
    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return auto_class(config).from_pretrained(
            path, config=config, dtype=torch.float32, local_files_only=True
        )
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"model.path: cannot load a language model from {path}: {err}") from None


@dataclass
class SharedWeights:
    """A model's config and parameters as NumPy arrays: what goes into Ray's object store once.

    `buffers` holds the model's buffers too (Llama's rotary frequencies, say), which a model
    built on the meta device has no values for."""

    config: dict[str, Any]
    arrays: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> SharedWeights:
        arrays = {
            name: p.detach().to("cpu", torch.float32).numpy().copy()
            for name, p in model.named_parameters()
        }
        buffers = {name: b.detach().cpu().numpy().copy() for name, b in model.named_buffers()}
        return cls(config=model.config.to_dict(), arrays=arrays, buffers=buffers)

    def build(self, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None) -> PreTrainedModel:
        """A model with these weights on `device` (in `dtype`, default float32), built on the
        meta device and then filled: no random initialisation of parameters that are
        overwritten at once, no second copy of them in host memory on the way to a GPU, and
        no float32 copy on the way to bfloat16."""
        values = dict(self.config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        with torch.device("meta"):
            model = auto_class(config).from_config(config)
        if dtype is not None:
            model = model.to(dtype)
        model = model.to_empty(device=device)
        model.tie_weights()  # to_empty gives tied parameters (lm_head, embeddings) apart
        load_arrays(model, self.arrays)
        missing = {n for n, _ in model.named_buffers()} - set(self.buffers)
        if missing:
            raise ModelError(f"shared weights lack buffers: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(torch.as_tensor(self.buffers[name]))
        return model


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec's resources.weights_dtype."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, not {name!r}")
    return WEIGHT_DTYPES[name]


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


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of a batch the loss is taken on (the same for both model kinds)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _compact(values: torch.Tensor, keep: torch.Tensor, fill: int) -> torch.Tensor:
    """Per row, the kept values moved to the left, right-padded with `fill` (width >= 1)."""
    rank = keep.long().cumsum(dim=1) - 1
    width = max(int(keep.sum(dim=1).max()) if keep.numel() else 0, 1)
    out = values.new_full((values.size(0), width), fill)
    rows = torch.arange(values.size(0), device=values.device).unsqueeze(1).expand_as(keep)
    out[rows[keep], rank[keep]] = values[keep]
    return out


def split_prompt_target(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """A flat batch (`<bos> prompt \\n target <eos>`, labels -100 on the prompt) as seq2seq
    inputs: the encoder gets the unlabelled prompt tokens (and always position 0), the decoder
    labels are the labelled tokens after position 0, so the loss covers exactly the tokens the
    causal shift would. Returns input_ids, attention_mask (encoder), labels (-100 padded)."""
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    encoder = (labels == IGNORE_INDEX) & mask
    encoder[:, 0] = True
    decoder = torch.zeros_like(encoder)
    decoder[:, 1:] = labels[:, 1:] != IGNORE_INDEX
    return {
        "input_ids": _compact(batch["input_ids"], encoder, pad_id),
        "attention_mask": _compact(torch.ones_like(labels), encoder, 0),
        "labels": _compact(labels, decoder, IGNORE_INDEX),
    }


def logits_and_labels(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits [B, T, V] and the labels they predict [B, T] (-100: no loss).

    Causal LMs: the next-token shift of the flat row. Encoder-decoder models: the prompt goes to
    the encoder and the target is the decoder's labels (split_prompt_target)."""
    if not is_encoder_decoder(model.config):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1], batch["labels"][:, 1:]
    inputs = split_prompt_target(batch, model.config.pad_token_id)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   decoder_input_ids=decoder_input_ids, use_cache=False).logits
    return logits, inputs["labels"]


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Per row: the sum of token cross-entropies over labelled tokens, and their count."""
    return row_cross_entropy(*logits_and_labels(model, batch))


def row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """token_losses from logits and the labels they predict (logits_and_labels')."""
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Sum of token cross-entropies over labelled tokens, and how many there were."""
    sums, counts = token_losses(model, batch)
    return sums.sum(), int(counts.sum())
