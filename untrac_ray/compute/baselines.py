"""The baselines UnTrac is compared with, in plain PyTorch: dataset-level gradients and their
dot products (GradDot, GradCos, TracIn) and influence functions with EK-FAC (kronfluence).

Sign convention as everywhere in untrac-ray: positive influence means the training set helps
the model fit the test set (training on it lowers the test loss).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from untrac_ray.compute.modeling import token_loss_sum
from untrac_ray.inputs.spec_methods import EkfacSpec
from untrac_ray.inputs.tokenization import IGNORE_INDEX, TokenizedSet


def flat_gradient(
    model: torch.nn.Module,
    data: TokenizedSet,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
    reduction: str = "mean",
) -> torch.Tensor:
    """Gradient of the dataset's mean token loss (reduction "mean") or summed token loss
    ("sum"), flattened (float32, on the model's device), accumulated batch by batch.

    Never holds per-example gradients: each batch's summed loss is back-propagated into the
    parameters' .grad, which accumulates; for the mean it is divided by the token count.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, not {reduction!r}")
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    tokens = 0
    for start in range(0, len(rows), batch_size):
        loss_sum, n = token_loss_sum(model, data.batch(rows[start : start + batch_size], device))
        loss_sum.backward()
        tokens += n
    # one float32 buffer, filled in place: the gradients and it, no other copy (memory.py)
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32,
                       device=params[0].device)
    start = 0
    for p in params:
        if p.grad is not None:
            flat[start : start + p.numel()].copy_(p.grad.reshape(-1))
        start += p.numel()
    if reduction == "mean":
        flat /= max(tokens, 1)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return flat


def dataset_gradient(
    model: torch.nn.Module,
    data: TokenizedSet,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
    reduction: str = "mean",
) -> np.ndarray:
    """`flat_gradient` as a float32 array in CPU memory."""
    return flat_gradient(model, data, rows, batch_size, device, reduction).cpu().numpy()


# Elements per piece when a dot product is taken in float64: bounds the float64 copies.
DOT_CHUNK = 1 << 24

Vector = torch.Tensor | np.ndarray


def _piece(x: Vector, start: int, device: torch.device) -> torch.Tensor:
    """x[start : start + DOT_CHUNK] in float64 on `device` (an array's piece is copied: one
    read from Ray's object store is read-only)."""
    piece = x[start : start + DOT_CHUNK]
    piece = torch.tensor(piece) if isinstance(piece, np.ndarray) else piece
    return piece.to(device, torch.float64)


def dot64(a: Vector, b: Vector, device: torch.device | str = "cpu") -> float:
    """a . b accumulated in float64 on `device`, a piece at a time."""
    device = torch.device(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(a), DOT_CHUNK):
        total += _piece(a, start, device) @ _piece(b, start, device)
    return float(total)


def gradient_products(
    name: str, grad: torch.Tensor, others: dict[str, np.ndarray]
) -> dict[tuple[str, str], float]:
    """The entries of the gradients' Gram matrix that GradDot, GradCos and TracIn use, in
    float64 on grad's device: {(name, o): g . g_o, (name, name): |g|^2, (o, o): |g_o|^2} for
    every o in `others`. The cells are made of these numbers: no gradient reaches the driver."""
    out = {(name, name): dot64(grad, grad, grad.device)}
    for other, values in others.items():
        out[(name, other)] = dot64(grad, values, grad.device)
        out[(other, other)] = dot64(values, values, grad.device)
    return out


def concat_rows(parts: list[tuple[TokenizedSet, np.ndarray]], name: str) -> TokenizedSet:
    """One TokenizedSet holding the chosen rows of several sets, in order."""
    ids, starts, lengths = [], [], []
    for data, rows in parts:
        for r in rows:
            s, e = data.offsets[r], data.offsets[r + 1]
            ids.append(np.asarray(data.input_ids[s:e], dtype=np.int64))
            starts.append(0 if data.loss_start is None else int(data.loss_start[r]))
            lengths.append(e - s)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    loss_start = np.asarray(starts, dtype=np.int32) if any(starts) else None
    return TokenizedSet(name, np.concatenate(ids), offsets, parts[0][0].pad_id, loss_start)


def _kronfluence_task():
    from kronfluence.module.utils import get_tracked_module_names, set_attention_mask
    from kronfluence.task import Task

    from untrac_ray.compute.modeling import logits_and_labels, split_prompt_target
    from untrac_ray.inputs.model_folder import is_encoder_decoder

    def module_masks(model: torch.nn.Module, batch) -> torch.Tensor | dict[str, torch.Tensor]:
        """The padding mask of each tracked module's inputs: the row's for a causal LM; for an
        encoder-decoder, the encoder's (encoder modules, cross-attention keys and values) or
        the decoder's (the other decoder modules and the LM head)."""
        if not is_encoder_decoder(model.config):
            return batch["attention_mask"]
        inputs = split_prompt_target(batch, model.config.pad_token_id)
        encoder, decoder = inputs["attention_mask"], (inputs["labels"] != IGNORE_INDEX).long()
        cross = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj",
                 "encoder_attn.v_proj")
        return {
            name: encoder if "encoder" in name.split(".") or name.endswith(cross) else decoder
            for name in get_tracked_module_names(model)
        }

    class LanguageModelTask(Task):
        """Summed token cross-entropy on labelled tokens, as kronfluence expects."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            # The padding masks depend on the model's kind, which get_attention_mask (given only
            # the batch) cannot know: set them here, before the forward pass that reads them.
            # (kronfluence reads masks only when fitting covariances; elsewhere they are unused.)
            set_attention_mask(model=model, attention_mask=module_masks(model, batch))
            logits, labels = logits_and_labels(model, batch)
            logits = logits.float()
            flat = logits.reshape(-1, logits.size(-1))
            if sample:  # labels drawn from the model: the true Fisher
                with torch.no_grad():
                    drawn = torch.multinomial(F.softmax(flat, dim=-1), 1).squeeze(-1)
                targets = torch.where(labels.reshape(-1) == IGNORE_INDEX,
                                      labels.reshape(-1), drawn)
            else:
                targets = labels.reshape(-1)
            return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_attention_mask(self, batch):
            return None  # set by compute_train_loss, which knows the model

    return LanguageModelTask()


def ekfac_influence(
    model: torch.nn.Module,
    train: dict[str, tuple[TokenizedSet, np.ndarray]],
    test: dict[str, tuple[TokenizedSet, np.ndarray]],
    settings: EkfacSpec,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> dict[tuple[str, str], float]:
    """Dataset-level influence functions (kronfluence, `settings.strategy`): for each (train
    set, test set), the example scores g_test . H^-1 g_train added up as follows.

    An example's loss is its summed token cross-entropy (kronfluence's train loss). Test side:
    the gradient of the test set's mean token loss, i.e. the scores summed over its evaluated
    rows and divided by their labelled tokens. Training side, `settings.aggregate` sum: the
    gradient of the set's summed token loss, i.e. the scores summed over its rows; when only
    some rows are scored (max_train_examples) the sampled sum is scaled by (the set's labelled
    tokens / the sampled rows' labelled tokens), so big sets are not capped. mean: that sum
    divided by the set's labelled tokens (its mean token loss). Labelled tokens are counted as
    the losses count them: labels[1:] != -100 per row.

    `precision` bf16 runs only the model's forward/backward passes in bf16: an outer autocast
    (the Workbench's) is switched off around kronfluence and its own `amp_dtype` set instead,
    so its covariances, eigendecompositions and scores stay in their float32/64 dtypes.

    The model is wrapped by kronfluence in place: pass a copy.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from untrac_ray.compute.precision import amp_dtype

    amp = amp_dtype(precision)
    train_names, test_names = list(train), list(test)
    train_all = concat_rows([train[n] for n in train_names], "train")
    test_all = concat_rows([test[n] for n in test_names], "test")
    task = _kronfluence_task()
    model = prepare_model(model.to(device), task)
    device_type = torch.device(device).type
    with (tempfile.TemporaryDirectory() as out,
          torch.autocast(device_type=device_type, enabled=False)):
        analyzer = Analyzer("untrac", model=model, task=task, cpu=device_type == "cpu",
                            disable_tqdm=True, output_dir=out, log_level=40)
        collate = _PairwiseCollate(train_all, test_all, device)
        analyzer.fit_all_factors(
            "factors", dataset=_Tagged(train_all, 1), per_device_batch_size=settings.batch_size,
            factor_args=FactorArguments(strategy=settings.strategy, amp_dtype=amp),
            dataloader_kwargs=DataLoaderKwargs(collate_fn=collate), overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            "scores", factors_name="factors",
            query_dataset=_Tagged(test_all, 0), train_dataset=_Tagged(train_all, 1),
            per_device_query_batch_size=settings.batch_size,
            per_device_train_batch_size=settings.batch_size,
            dataloader_kwargs=DataLoaderKwargs(collate_fn=collate),
            score_args=ScoreArguments(damping_factor=settings.damping, amp_dtype=amp),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().cpu().numpy()
    # scores: [test rows, train rows], in the order of the concatenated sets
    train_bounds = np.cumsum([0] + [len(train[n][1]) for n in train_names])
    test_bounds = np.cumsum([0] + [len(test[n][1]) for n in test_names])
    test_tokens = [_labelled_tokens(*test[n]) for n in test_names]
    out_scores = {}
    for k, tname in enumerate(train_names):
        data, rows = train[tname]
        sampled = max(_labelled_tokens(data, rows), 1)
        if settings.aggregate == "mean":
            scale = 1.0 / sampled  # (sum scaled to the whole set) / the set's tokens
        else:
            scale = _labelled_tokens(data, np.arange(len(data))) / sampled
        for j, qname in enumerate(test_names):
            block = scores[test_bounds[j] : test_bounds[j + 1],
                           train_bounds[k] : train_bounds[k + 1]]
            out_scores[(tname, qname)] = float(block.sum() * scale / max(test_tokens[j], 1))
    return out_scores


def _labelled_tokens(data: TokenizedSet, rows: np.ndarray) -> int:
    """How many tokens of these rows carry a loss: labels[1:] != -100 in each row."""
    rows = np.asarray(rows, dtype=np.int64)
    labelled = np.concatenate([[0], np.cumsum(data.labels != IGNORE_INDEX)])
    starts, ends = data.offsets[rows], data.offsets[rows + 1]
    first = np.where(ends > starts, labelled[np.minimum(starts + 1, ends)] - labelled[starts], 0)
    return int((labelled[ends] - labelled[starts] - first).sum())


@dataclass
class _Tagged(torch.utils.data.Dataset):
    """Rows of one of two sets, tagged so that one collate function serves both loaders."""

    data: TokenizedSet
    tag: int

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return (self.tag, i)


@dataclass
class _PairwiseCollate:
    train: TokenizedSet
    test: TokenizedSet
    device: torch.device | str

    def __call__(self, items: list[tuple[int, int]]):
        source = self.test if items[0][0] == 0 else self.train
        return source.batch([i for _, i in items], self.device)
