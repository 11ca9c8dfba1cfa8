"""Lean actors (issue 12): models built on the meta device, one device copy of the weights,
bf16 weights with the optimizer the user picks, gradient checkpointing. Plain PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from untrac_ray.compute.modeling import SharedWeights, build_model, load_arrays
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.schedule import eval_schedules
from untrac_ray.methods.tasks import EvalTask, UnlearnTask
from untrac_ray.methods.workbench import Workbench

TINY = {
    "gpt2": dict(n_embd=32, n_head=2, n_layer=2, n_positions=64),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, word_embed_proj_dim=32),
    "t5": dict(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16),
}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_a_model_built_on_the_meta_device_holds_the_same_weights_and_buffers(model_type):
    config = AutoConfig.for_model(model_type, vocab_size=300, bos_token_id=1, eos_token_id=1,
                                  pad_token_id=1, decoder_start_token_id=1, **TINY[model_type])
    model = build_model(config, seed=3).eval()
    shared = SharedWeights.from_model(model)
    built = shared.build("cpu").eval()
    assert all(p.device.type == "cpu" for p in built.parameters())
    want, got = model.state_dict(), built.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)  # rotary buffers included
    assert len(list(built.parameters())) == len(list(model.parameters()))  # ties kept
    ids = torch.randint(0, 300, (2, 9))
    extra = {"decoder_input_ids": ids} if model_type == "t5" else {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, **extra).logits,
                           built(input_ids=ids, **extra).logits)


@pytest.fixture
def parts(bench_parts):
    return bench_parts


def _untrac(bench: Workbench, forget: str, settings: UnlearnSpec) -> UnlearnTask:
    schedule = eval_schedules(settings, {forget: len(bench.datasets[forget])})[forget]
    return UnlearnTask("untrac", forget, ("next_number", "twice"), settings, schedule)


def test_the_workbench_keeps_one_copy_of_the_weights_and_resets_from_the_shared_arrays(parts):
    weights, sets, indices = parts
    bench = Workbench({"base": weights}, sets, indices, 16)
    assert not hasattr(bench, "pristine")
    params = sum(p.numel() for p in bench.model.parameters())
    tensors = [t for t in vars(bench).values() if isinstance(t, torch.Tensor)]
    assert not tensors  # no weight-sized tensor beside the model
    settings = UnlearnSpec(optimizer="adam", learning_rate=1e-2, batch_size=8)
    first = bench.run(_untrac(bench, "add_one", settings)).losses
    bench.reset()
    now = dict(bench.model.named_parameters())
    assert all(np.array_equal(now[n].detach().numpy(), a) for n, a in weights.arrays.items())
    assert bench.run(_untrac(bench, "add_one", settings)).losses == first
    assert params == sum(a.size for a in weights.arrays.values())


def _cells(bench: Workbench, forget: str, settings: UnlearnSpec) -> np.ndarray:
    """The influence cells of unlearning `forget`: test losses after minus before."""
    bench.reset()
    base = bench.run(EvalTask(("next_number", "twice"))).losses[0]
    out = bench.run(_untrac(bench, forget, settings)).losses
    return np.array([out[max(out)][t] - base[t] for t in ("next_number", "twice")])


def test_bf16_weights_halve_the_model_and_unlearn_as_float32_does(parts):
    """At the default learning rate (Adam, 5e-5) a step moves a weight by about 5e-5, below
    half a bf16 unit of every weight above 0.0078 in magnitude: rounded to nearest, those never
    moved, and cells came out up to 9e-3 away from float32's (a quarter of the cell). Stepped
    in float32 and rounded stochastically, every cell is within 1.5e-3 of float32's (the
    losses are about 4.5; a bf16 forward pass alone moves them by more than that)."""
    weights, sets, indices = parts
    fp32 = Workbench({"base": weights}, sets, indices, 16)
    bf16 = Workbench({"base": weights}, sets, indices, 16, weights_dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    size = {name: sum(p.numel() * p.element_size() for p in b.model.parameters())
            for name, b in (("fp32", fp32), ("bf16", bf16))}
    assert size["bf16"] * 2 == size["fp32"]
    base32 = fp32.run(EvalTask(("next_number",))).losses[0]["next_number"]
    base16 = bf16.run(EvalTask(("next_number",))).losses[0]["next_number"]
    assert abs(base16 - base32) < 0.02 * base32  # bf16 rounding of the same weights
    for optimizer, lr in (("adam", 5e-5), ("adafactor", 5e-5), ("sgd", 5e-3)):
        settings = UnlearnSpec(optimizer=optimizer, learning_rate=lr)
        for forget in ("add_one", "spell"):
            want, got = _cells(fp32, forget, settings), _cells(bf16, forget, settings)
            assert np.abs(want).max() > 1e-2, (optimizer, forget, want)  # the model moved
            assert np.abs(got - want).max() <= 1.5e-3, (optimizer, forget, want, got)
    with pytest.raises(ValueError, match="weights_dtype"):
        Workbench({"base": weights}, sets, indices, 16, weights_dtype="fp8")


def test_a_bf16_weight_takes_adam_steps_below_half_a_unit():
    """The check by hand: a bf16 weight of 0.02 after 10 Adam steps at 5e-5 moves to 0.0195
    as in float32 (on average over many weights: each is rounded up or down at random), where
    Adam on the bf16 weights themselves leaves every one at 0.0200195."""
    from untrac_ray.compute.optim import make_optimizer

    def ten_steps(dtype: torch.dtype, optimizer=make_optimizer) -> torch.Tensor:
        start = torch.full((200_000,), 0.02).to(torch.bfloat16)  # 0.0200195, as bf16 holds it
        w = torch.nn.Parameter(start.to(dtype))
        opt = optimizer("adam", [w], 5e-5, seed=1)
        for _ in range(10):
            w.grad = torch.ones_like(w)
            opt.step()
        return w.detach().float()

    want = ten_steps(torch.float32)
    assert float(want.mean()) == pytest.approx(0.0200195 - 10 * 5e-5, abs=1e-6)
    got = ten_steps(torch.bfloat16)  # each weight's rounding noise: about 2e-4 after 10 steps
    assert float(got.mean()) == pytest.approx(float(want.mean()), abs=2e-6)
    assert float(got.max()) <= 0.0200196 and float(got.std()) > 5e-5  # each moved by chance
    plain = ten_steps(torch.bfloat16, lambda n, p, lr, seed: torch.optim.Adam(p, lr=lr))
    assert set(plain.unique().tolist()) == {0.02001953125}  # round to nearest: never moved
    assert ten_steps(torch.bfloat16).equal(got)  # seeded: the same steps, the same weights


def test_gradient_checkpointing_gives_the_same_cells(parts):
    weights, sets, indices = parts
    plain = Workbench({"base": weights}, sets, indices, 16)
    saved = Workbench({"base": weights}, sets, indices, 16, gradient_checkpointing=True)
    assert saved.model.is_gradient_checkpointing
    settings = UnlearnSpec(optimizer="adam", learning_rate=1e-2, batch_size=8, seed=4)
    a = plain.run(_untrac(plain, "double", settings)).losses
    b = saved.run(_untrac(saved, "double", settings)).losses
    assert sorted(a) == sorted(b)
    for step in a:  # dropout is on: the same seeds draw the same masks when recomputed
        for name in a[step]:
            assert b[step][name] == pytest.approx(a[step][name], rel=1e-5)


def test_load_arrays_casts_the_shared_float32_arrays_into_bf16_parameters(parts):
    weights, _, _ = parts
    model = weights.build("cpu").to(torch.bfloat16)
    load_arrays(model, weights.arrays)
    name, array = next(iter(weights.arrays.items()))
    got = dict(model.named_parameters())[name]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.as_tensor(array).to(torch.bfloat16))


# ---------------------------------------------------------------- the memory formula, by hand


def test_activation_bytes_by_hand():
    from untrac_ray.compute.memory import Shape, activation_bytes

    shape = Shape(layers=2, hidden=4, heads=1, vocab=10)
    # per layer (34*S*B*H + 5*A*S^2*B) * 2 in float32 = (272 + 20) * 2; logits 3*B*S*V*4 = 240
    assert activation_bytes(shape, rows=1, tokens=2, weight_bytes=4) == 2 * 584 + 240
    # checkpointing: every layer keeps its input (S*B*H*4 = 32), one layer's activations live
    assert activation_bytes(shape, 1, 2, 4, checkpointing=True) == 2 * 32 + 584 + 240
    assert activation_bytes(shape, 1, 2, 2) == 2 * 292 + 240  # bf16: the 16-bit figures


def test_optimizer_state_bytes_by_hand():
    from untrac_ray.compute.memory import optimizer_state_bytes

    model = torch.nn.Linear(3, 5)  # weight 5x3, bias 5: 20 parameters
    assert optimizer_state_bytes(model, "adam", 4) == 2 * 4 * 20
    assert optimizer_state_bytes(model, "adamw", 2) == 2 * 2 * 20
    assert optimizer_state_bytes(model, "sgd", 4) == 0
    assert optimizer_state_bytes(model, "adafactor", 4) == 4 * ((5 + 3) + 5)


def test_actor_memory_counts_the_base_copy_of_npo_and_the_kl_term_exactly_then(parts):
    """NPO and the KL term keep a frozen copy of the base model during an unlearning task
    (unlearning.frozen_base): the estimate grows by the weights' size then, and only then."""
    from untrac_ray.compute import memory

    weights, _, _ = parts
    model = weights.build("cpu")
    p = sum(t.numel() for t in model.parameters())
    plain = UnlearnSpec()
    for settings, needs in ((plain, False), (plain.model_copy(update={"retain_weight": 1.0}),
                                             False),
                            (plain.model_copy(update={"objective": "npo"}), True),
                            (plain.model_copy(update={"kl_weight": 0.5}), True)):
        assert memory.needs_base_copy(settings) is needs, settings
    for dtype, b in (("fp32", 4), ("bf16", 2)):
        without = memory.actor_memory(model, optimizer="adam", rows=8, tokens=64,
                                      weights_dtype=dtype)
        with_copy = memory.actor_memory(model, optimizer="adam", rows=8, tokens=64,
                                        weights_dtype=dtype, base_copy=True)
        assert with_copy.base_copy == p * b and without.base_copy == 0
        assert with_copy.total(100) - without.total(100) == p * b


def test_actor_memory_adds_its_terms(parts):
    from untrac_ray.compute.memory import actor_memory

    weights, _, _ = parts
    model = weights.build("cpu")
    p = sum(t.numel() for t in model.parameters())
    m = actor_memory(model, optimizer="adam", rows=8, tokens=64, test_sets=2)
    assert (m.weights, m.gradients, m.optimizer, m.shared_weights) == (4 * p, 4 * p, 8 * p, 4 * p)
    assert m.shared_gradients == 2 * 4 * p  # two test gradients, mapped once read
    assert m.gradient_task == 4 * p + 4 * p
    unlearning = m.gradients + m.optimizer + m.activations
    assert m.total(100) == 100 + 16 * p + max(unlearning, m.gradient_task)
    assert m.rounding == 0  # float32 weights are stepped in place
    half = actor_memory(model, optimizer="adam", rows=8, tokens=64, weights_dtype="bf16")
    assert half.weights * 2 == m.weights and half.optimizer * 2 == m.optimizer
    largest = max(t.numel() for t in model.parameters())
    assert half.rounding == (4 + 2) * largest * 4  # one parameter's float32 copies
    assert half.total(0) == (half.weights + half.shared_weights + half.gradients
                             + half.optimizer + max(half.activations, half.rounding))
