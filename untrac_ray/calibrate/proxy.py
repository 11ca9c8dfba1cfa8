"""The proxy of a job: the same model family shrunk, trained from scratch on a sample of the
same corpora, with the same test sets and tokenizer, so that it can be retrained many times.

`proxy_spec` makes it. The model comes from the job's own model (its config.json, or its
model.config) with width and depth set by a preset or by `--proxy-config`; with
`--proxy-model FOLDER` the proxy is instead a small base model the user names, fine-tuned on
the job's training sets as the job's `training` says. Every training set is a seeded sample
(`sample_rows`), the test sets are the job's, and the training of a from-scratch proxy is the
job's own where the job trains its model, else PROXY_TRAINING.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.hub import model_folder
from untrac_ray.inputs.model_folder import folder_config
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import ModelSpec, TokenizerSpec, TrainingSpec

# Width, depth and heads of the proxy presets: tiny and small are the sizes of this
# repository's benchmark models (docs/benchmarks.md), base 16 times small's layers' weights.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4},
    "small": {"hidden": 128, "layers": 2, "heads": 4},
    "base": {"hidden": 256, "layers": 4, "heads": 4},
}
DEFAULT_PRESET = "small"
DEFAULT_SAMPLE_ROWS = 2000
# A from-scratch proxy of a model the job does not train (an analysis of a given model):
# enough steps to learn the sample, and checkpoints for TracIn.
PROXY_TRAINING = {"optimizer": "adamw", "learning_rate": 1e-3, "batch_size": 32, "epochs": 2,
                  "warmup_steps": 10, "checkpoint_every": 10}

# The names families give the same sizes (Llama/NeoX/OPT, GPT-2, T5).
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads")
_FFN = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
_PER_HEAD = ("head_dim", "d_kv")
_DROPPED = ("architectures", "_name_or_path", "torch_dtype", "transformers_version", "auto_map",
            "quantization_config", "dtype")


def shrink_config(config: dict[str, Any], size: dict[str, int]) -> dict[str, Any]:
    """`config` (a model's config.json or model.config) with its width, depth and heads set
    to `size` (hidden, layers, heads), its feed-forward width 4x hidden, its key-value heads
    and per-head width to match, under whichever names its family uses."""
    if "model_type" not in config:
        raise SpecError("the job's model config has no model_type: give --proxy-config")
    out = {k: v for k, v in config.items() if k not in _DROPPED}
    hidden, layers, heads = size["hidden"], size["layers"], size["heads"]
    if hidden % heads:
        raise SpecError(f"proxy: hidden {hidden} is not a multiple of heads {heads}")
    for names, value in ((_HIDDEN, hidden), (_LAYERS, layers), (_HEADS, heads),
                         (_FFN, 4 * hidden), (_PER_HEAD, hidden // heads)):
        present = [n for n in names if out.get(n) is not None]
        for name in present:
            out[name] = value
        if not present and names[0] in ("hidden_size", "num_hidden_layers",
                                         "num_attention_heads"):
            out[names[0]] = value
    if out.get("num_key_value_heads") is not None:
        out["num_key_value_heads"] = heads
    if out.get("word_embed_proj_dim") is not None:  # OPT
        out["word_embed_proj_dim"] = hidden
    return out


def job_model_config(spec: JobSpec) -> dict[str, Any]:
    """The job's model config: model.config, or the config.json of its folder (a Hub model's
    snapshot folder)."""
    if spec.model.config is not None:
        return dict(spec.model.config)
    return folder_config(model_folder(spec.model))


def proxy_spec(spec: JobSpec, preset: str = DEFAULT_PRESET,
               proxy_config: dict[str, Any] | None = None, proxy_model: str | None = None,
               sample_rows: int = DEFAULT_SAMPLE_ROWS) -> JobSpec:
    """The proxy job of `spec` (see the module docstring); its methods are the job's, to be
    replaced per draw (study.py)."""
    raw = spec.model_dump(mode="python")
    raw["name"] = f"{spec.name}-proxy"
    raw["ground_truth"] = raw["search"] = None
    if proxy_model is not None:
        local = Path(proxy_model).expanduser()
        path = str(local.resolve()) if local.exists() else proxy_model  # else a Hub id
        raw["model"] = ModelSpec(path=path, finetune=True).model_dump(mode="python")
        raw["tokenizer"] = {**raw["tokenizer"], "kind": None, "path": None}
    else:
        if proxy_config is not None:
            config = dict(proxy_config)
            config.setdefault("model_type", job_model_config(spec)["model_type"])
        else:
            if preset not in PRESETS:
                raise SpecError(f"--preset: unknown {preset!r}; choose from "
                                + ", ".join(PRESETS))
            config = shrink_config(job_model_config(spec), PRESETS[preset])
        raw["model"] = {"config": config}
        if spec.model.path is not None:  # the model's own tokenizer, from its folder
            raw["tokenizer"] = TokenizerSpec(
                kind="pretrained", path=spec.tokenizer.path or model_folder(spec.model),
                max_length=spec.tokenizer.max_length,
                block_size=spec.tokenizer.block_size).model_dump(mode="python")
        if not spec.model.trained_by_job:
            raw["training"] = TrainingSpec(**PROXY_TRAINING).model_dump(mode="python")
    training = raw["training"]
    if not (training.get("checkpoints") or training.get("checkpoint_every")):
        training["checkpoint_every"] = PROXY_TRAINING["checkpoint_every"]  # for TracIn
    training["output_dir"] = None  # the cache, keyed by the proxy's own settings
    for ds in raw["data"]["train"]:
        if ds.get("max_rows") is not None:
            ds["max_rows"] = min(ds["max_rows"], sample_rows)
        else:
            ds["sample_rows"] = min(ds.get("sample_rows") or sample_rows, sample_rows)
    return JobSpec.model_validate(raw)
