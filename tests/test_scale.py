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


def test_bf16_weights_halve_the_model_and_unlearn_with_adafactor_or_adam(parts):
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
    for optimizer, lr in (("adafactor", 1e-2), ("adam", 1e-2)):
        settings = UnlearnSpec(optimizer=optimizer, learning_rate=lr, batch_size=8)
        out = bf16.run(_untrac(bf16, "add_one", settings)).losses
        last = out[max(out)]
        assert all(np.isfinite(v) for v in last.values())
        # ascent on add_one moved the model: the test losses changed from the base ones
        assert last["next_number"] != pytest.approx(base16, abs=1e-4)
    with pytest.raises(ValueError, match="weights_dtype"):
        Workbench({"base": weights}, sets, indices, 16, weights_dtype="fp8")


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
    half = actor_memory(model, optimizer="adam", rows=8, tokens=64, weights_dtype="bf16")
    assert half.weights * 2 == m.weights and half.optimizer * 2 == m.optimizer
