"""Unlearning objectives beyond gradient ascent (issue 27): NPO (arXiv 2404.05868) and a KL
term that holds the base model's predictions on the kept sets. Each is checked against steps
computed by hand with SGD (a scale-sensitive optimizer: a wrongly scaled gradient moves the
weights by the wrong amount), over two steps, since at the first step the model is the base
model, where NPO's weights are exactly 1 and the KL term's gradient is exactly 0."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import merge, run_through_cli, tiny_spec
from untrac_ray.compute import unlearning
from untrac_ray.compute.modeling import logits_and_labels, token_losses
from untrac_ray.compute.optim import batch_schedule, seed_dropout
from untrac_ray.compute.unlearning import Retain
from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.loading import parse_spec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.inputs.tokenization import IGNORE_INDEX
from untrac_ray.methods.schedule import eval_schedules
from untrac_ray.methods.tasks import UnlearnTask
from untrac_ray.methods.workbench import Workbench

TEST_SETS = ("next_number", "twice")
KEPT = ("double", "spell")


@pytest.fixture
def bench(bench_parts) -> Workbench:
    weights, sets, indices = bench_parts
    bench = Workbench({"base": weights}, sets, indices, eval_batch_size=16)
    for module in bench.model.modules():  # dropout off: the hand loop sees the same model
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return bench


def _task(bench, settings, retain=(), evaluate=TEST_SETS, forget="add_one") -> UnlearnTask:
    schedule = eval_schedules(settings, {forget: len(bench.datasets[forget])})[forget]
    return UnlearnTask("untrac", forget, evaluate, settings, schedule, retain=retain)


def _sgd_by_hand(bench, objective, steps: int) -> list[torch.Tensor]:
    """`steps` SGD steps (lr 0.1) of objective(step) from the base weights; the weights."""
    bench.reset()
    bench.model.train()
    params = list(bench.model.parameters())
    for step in range(steps):
        grads = torch.autograd.grad(objective(step), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.1 * g
    return [p.detach().clone() for p in params]


def _check_same_weights(bench, expected: list[torch.Tensor]) -> None:
    for p, want in zip(bench.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-6)


def test_two_npo_steps_equal_npos_loss_by_hand_scaled_to_the_papers_ascent(bench):
    """NPO's loss (2/beta) * mean log(1 + (p/p_base)^beta) over a batch's rows, scaled by
    rows / tokens; p_base from the base model. The second step's weights are far from 1."""
    beta = 0.5
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.1, batch_size=4, max_steps=2,
                           objective="npo", npo_beta=beta, seed=3)
    data = bench.datasets["add_one"]
    batches = list(batch_schedule(len(data), 4, 2, seed=3))
    bench.reset()
    bench.model.eval()
    with torch.no_grad():
        base = token_losses(bench.model, data.batch(np.arange(len(data)), "cpu"))[0]
    seen = []

    def npo_loss(step: int) -> torch.Tensor:
        batch = data.batch(batches[step], "cpu")
        sums, counts = token_losses(bench.model, batch)
        log_ratio = base[torch.as_tensor(batches[step])] - sums  # log p - log p_base
        seen.append(2 * torch.sigmoid(beta * log_ratio.detach()))  # NPO's weights
        loss = (2 / beta) * F.softplus(beta * log_ratio).mean()
        return loss * len(batches[step]) / counts.sum()

    expected = _sgd_by_hand(bench, npo_loss, steps=2)
    assert torch.allclose(seen[0], torch.ones(4))  # the base model: the paper's ascent
    assert (seen[1] - 1).abs().max() > 0.05, seen[1]  # the second step is weighted
    bench.run(_task(bench, settings))
    _check_same_weights(bench, expected)

    # and the paper's ascent by hand is not the same two steps (the test can tell them apart)
    def ascent(step: int) -> torch.Tensor:
        sums, counts = token_losses(bench.model, data.batch(batches[step], "cpu"))
        return -sums.sum() / counts.sum()

    plain = _sgd_by_hand(bench, ascent, steps=2)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, expected, strict=True)) > 1e-4


def test_two_steps_with_the_kl_term_equal_ascent_plus_weighted_kl_by_hand(bench):
    """Each step: - mean loss(forget batch) + 0.5 mean loss(kept batch) + 2 * mean over the
    kept batch's tokens of KL(base || model), the base model frozen before the first step."""
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.1, batch_size=4, max_steps=2,
                           retain_weight=0.5, kl_weight=2.0, retain_batch_size=6, seed=3)
    data = bench.datasets["add_one"]
    kept = [bench.datasets[n] for n in KEPT]
    batches = list(batch_schedule(len(data), 4, 2, seed=3))
    sampler = Retain(kept, 0.5, 6, seed=3)
    kept_batches = [sampler.draw(), sampler.draw()]
    bench.reset()
    reference = copy.deepcopy(bench.model).eval()
    kls = []

    def objective(step: int) -> torch.Tensor:
        sums, counts = token_losses(bench.model, data.batch(batches[step], "cpu"))
        total = -sums.sum() / counts.sum()
        ce, kl, n = 0.0, 0.0, 0
        for part, rows in kept_batches[step]:
            batch = part.batch(rows, "cpu")
            logits, labels = logits_and_labels(bench.model, batch)
            with torch.no_grad():
                ref_logits, _ = logits_and_labels(reference, batch)
            mask = labels != IGNORE_INDEX
            ce = ce + F.cross_entropy(logits[mask], labels[mask], reduction="sum")
            per_token = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1),
                                 log_target=True, reduction="none").sum(-1)
            kl = kl + per_token[mask].sum()
            n += int(mask.sum())
        kls.append(float(kl) / n)
        return total + 0.5 * ce / n + 2.0 * kl / n

    expected = _sgd_by_hand(bench, objective, steps=2)
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[1] > 1e-4, kls
    bench.run(_task(bench, settings, retain=KEPT))
    _check_same_weights(bench, expected)

    no_kl = settings.model_copy(update={"kl_weight": 0.0})
    bench.run(_task(bench, no_kl, retain=KEPT))
    moved = max(float((p.detach() - w).abs().max())
                for p, w in zip(bench.model.parameters(), expected, strict=True))
    assert moved > 1e-5  # without the KL term the weights end elsewhere


def test_npo_slows_the_collapse_and_the_kl_term_holds_the_kept_sets(bench):
    """At a learning rate where plain ascent drives the unlearned set's loss up without
    bound, NPO's rise is much smaller; the KL term keeps the kept sets nearer the base."""
    evaluate = ("add_one", *KEPT)
    base = bench.evaluate(evaluate)[0]
    hard = UnlearnSpec(optimizer="adam", learning_rate=3e-2, batch_size=4, max_steps=30,
                       seed=1)
    plain = bench.run(_task(bench, hard, evaluate=evaluate)).losses[30]
    npo = bench.run(_task(bench, hard.model_copy(update={"objective": "npo", "npo_beta": 1.0}),
                          evaluate=evaluate)).losses[30]
    rise_plain, rise_npo = plain["add_one"] - base["add_one"], npo["add_one"] - base["add_one"]
    assert rise_npo > 0 and rise_npo < 0.5 * rise_plain, (rise_plain, rise_npo)
    held = bench.run(_task(bench, hard.model_copy(update={"kl_weight": 5.0}), retain=KEPT,
                           evaluate=evaluate)).losses[30]
    for name in KEPT:
        assert abs(held[name] - base[name]) < abs(plain[name] - base[name]), name


def test_npo_and_kl_through_a_job_and_where_they_are_refused(tmp_path):
    spec = merge(tiny_spec(tmp_path), {"methods": {
        "untrac": {"objective": "npo", "npo_beta": 0.2},
        "untrac_inv": {"kl_weight": 1.0}}})
    out = run_through_cli(tmp_path, spec)
    table = out["table"]
    assert set(table["method"]) == {"untrac", "untrac_inv"}
    assert np.isfinite(table["influence"]).all() and (table["influence"] != 0).any()
    params = out["run"].data.params
    assert params["methods.untrac.objective"] == "npo"
    assert params["methods.untrac_inv.kl_weight"] == "1.0"

    sharded = merge(spec, {"resources": {"actors_per_task": 2}, "methods": {"untrac_inv": None}})
    with pytest.raises(SpecError, match="methods.untrac: NPO and the KL term need the base"):
        parse_spec(sharded, base_dir=tmp_path)
    searched = merge(spec, {"methods": {"ldo": {}, "untrac_inv": None},
                            "search": {"space": {"untrac.learning_rate": [1e-4, 1e-3]}}})
    with pytest.raises(SpecError, match="methods.untrac.objective: `tune` runs the paper's"):
        parse_spec(searched, base_dir=tmp_path)


# Issue 31: with dropout on (the fixtures' 0.1), the base model's side of NPO and of the KL
# term is computed as the ascending model's forward is: in train mode, with the same dropout
# masks. Otherwise the first step is not the paper's ascent and the KL term is not zero.


def _one_sgd_step_by_hand(bench, loss_of_model, seed: int) -> list[torch.Tensor]:
    """One SGD step (lr 0.1) from the base weights, in train mode, the dropout masks drawn
    from `seed` as unlearn draws them."""
    bench.reset()
    bench.model.train()
    seed_dropout(seed)
    params = list(bench.model.parameters())
    grads = torch.autograd.grad(loss_of_model(bench.model), params)
    with torch.no_grad():
        return [(p - 0.1 * g).detach().clone() for p, g in zip(params, grads, strict=True)]


def test_npo_first_step_with_dropout_is_the_papers_ascent_at_npos_closed_form(
        bench_parts, monkeypatch):
    """At step one the model is the base model: NPO's log-ratio is 0 for every row, its loss
    (2/beta) log 2, its gradient the paper's ascent on the mean token loss, under the masks the
    step draws."""
    weights, sets, indices = bench_parts
    bench = Workbench({"base": weights}, sets, indices, eval_batch_size=16)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in bench.model.modules())
    beta, seed = 0.5, 3
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.1, batch_size=4, max_steps=1,
                           objective="npo", npo_beta=beta, seed=seed)
    data = bench.datasets["add_one"]
    rows = next(iter(batch_schedule(len(data), 4, 1, seed=seed)))

    def ascent(model) -> torch.Tensor:
        sums, counts = token_losses(model, data.batch(rows, "cpu"))
        return -sums.sum() / counts.sum()

    expected = _one_sgd_step_by_hand(bench, ascent, seed)
    seen = []
    real = getattr(unlearning, "npo_row_losses", None)

    def spy(*args):
        out = real(*args)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(unlearning, "npo_row_losses", spy, raising=False)
    bench.run(_task(bench, settings))
    _check_same_weights(bench, expected)  # the gradient: the paper's ascent
    assert len(seen) == 1 and len(seen[0]) == len(rows)
    torch.testing.assert_close(seen[0], torch.full((len(rows),), (2 / beta) * np.log(2.0)))


def test_the_kl_term_is_zero_at_step_one_with_dropout(bench_parts, monkeypatch):
    """The base model's logits under the same masks as the model's: KL exactly 0 at step one,
    so the step is that without the KL term."""
    weights, sets, indices = bench_parts
    bench = Workbench({"base": weights}, sets, indices, eval_batch_size=16)
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.1, batch_size=4, max_steps=1,
                           retain_weight=0.5, kl_weight=2.0, retain_batch_size=6, seed=3)
    kls = []
    real = unlearning.kl_from_reference

    def spy(*args):
        out = real(*args)
        kls.append(float(out))
        return out

    monkeypatch.setattr(unlearning, "kl_from_reference", spy)
    bench.run(_task(bench, settings, retain=KEPT))
    with_kl = [p.detach().clone() for p in bench.model.parameters()]
    assert kls and all(kl == 0.0 for kl in kls), kls
    bench.run(_task(bench, settings.model_copy(update={"kl_weight": 0.0}), retain=KEPT))
    for p, want in zip(bench.model.parameters(), with_kl, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)
