"""The baselines UnTrac is compared with, in plain PyTorch: dataset-level gradients (GradDot,
GradCos, TracIn) and influence functions with EK-FAC (kronfluence).

Sign convention as everywhere in untrac-ray: positive influence means the training set helps
the model fit the test set (training on it lowers the test loss).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from untrac_ray.modeling import token_loss_sum
from untrac_ray.spec import EkfacSpec
from untrac_ray.tokenization import IGNORE_INDEX, TokenizedSet


def dataset_gradient(
    model: torch.nn.Module,
    data: TokenizedSet,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Gradient of the dataset's mean token loss, flattened, accumulated batch by batch.

    Never holds per-example gradients: each batch's summed loss is back-propagated into the
    parameters' .grad, which accumulates; the sum is divided by the token count at the end.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    tokens = 0
    for start in range(0, len(rows), batch_size):
        loss_sum, n = token_loss_sum(model, data.batch(rows[start : start + batch_size], device))
        loss_sum.backward()
        tokens += n
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
    ]) / max(tokens, 1)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return flat.detach().to("cpu", torch.float32).numpy()


def concat_rows(parts: list[tuple[TokenizedSet, np.ndarray]], name: str) -> TokenizedSet:
    """One TokenizedSet holding the chosen rows of several sets, in order."""
    ids, labels, lengths = [], [], []
    for data, rows in parts:
        for r in rows:
            s, e = data.offsets[r], data.offsets[r + 1]
            ids.append(data.input_ids[s:e])
            labels.append(data.labels[s:e])
            lengths.append(e - s)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSet(name, np.concatenate(ids), np.concatenate(labels), offsets,
                        parts[0][0].pad_id)


def _kronfluence_task():
    from kronfluence.task import Task

    class LanguageModelTask(Task):
        """Summed token cross-entropy on labelled tokens, as kronfluence expects."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
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
            return batch["attention_mask"]

    return LanguageModelTask()


def ekfac_influence(
    model: torch.nn.Module,
    train: dict[str, tuple[TokenizedSet, np.ndarray]],
    test: dict[str, tuple[TokenizedSet, np.ndarray]],
    settings: EkfacSpec,
    device: torch.device | str = "cpu",
) -> dict[tuple[str, str], float]:
    """Dataset-level influence functions: for each (train set, test set), the sum over the
    training rows of EK-FAC example scores, averaged over the test set's rows.

    The model is wrapped by kronfluence in place: pass a copy.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    train_names, test_names = list(train), list(test)
    train_all = concat_rows([train[n] for n in train_names], "train")
    test_all = concat_rows([test[n] for n in test_names], "test")
    task = _kronfluence_task()
    model = prepare_model(model.to(device), task)
    cpu = torch.device(device).type == "cpu"
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("untrac", model=model, task=task, cpu=cpu, disable_tqdm=True,
                            output_dir=out, log_level=40)
        collate = _PairwiseCollate(train_all, test_all, device)
        analyzer.fit_all_factors(
            "factors", dataset=_Tagged(train_all, 1), per_device_batch_size=settings.batch_size,
            factor_args=FactorArguments(strategy=settings.strategy),
            dataloader_kwargs=DataLoaderKwargs(collate_fn=collate), overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            "scores", factors_name="factors",
            query_dataset=_Tagged(test_all, 0), train_dataset=_Tagged(train_all, 1),
            per_device_query_batch_size=settings.batch_size,
            per_device_train_batch_size=settings.batch_size,
            dataloader_kwargs=DataLoaderKwargs(collate_fn=collate),
            score_args=ScoreArguments(damping_factor=settings.damping),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().cpu().numpy()
    # scores: [test rows, train rows]
    train_bounds = np.cumsum([0] + [len(train[n][1]) for n in train_names])
    test_bounds = np.cumsum([0] + [len(test[n][1]) for n in test_names])
    out_scores = {}
    for k, tname in enumerate(train_names):
        for j, qname in enumerate(test_names):
            rows = slice(test_bounds[j], test_bounds[j + 1])
            cols = slice(train_bounds[k], train_bounds[k + 1])
            out_scores[(tname, qname)] = float(scores[rows, cols].sum(axis=1).mean())
    return out_scores


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
