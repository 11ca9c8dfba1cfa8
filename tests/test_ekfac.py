"""Influence functions through kronfluence, really run: on a tiny Llama, with training sets
of unequal sizes, against hand-computed dataset gradients; and the Workbench's precision."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("kronfluence")

from untrac_ray.compute.baselines import ekfac_influence  # noqa: E402
from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict  # noqa: E402
from untrac_ray.inputs.spec_methods import EkfacSpec
from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec
from untrac_ray.inputs.tokenization import (  # noqa: E402
    IGNORE_INDEX,
    TokenizedSet,
    byte_level_tokenizer,
    tokenize_rows,
)
from untrac_ray.methods.tasks import EkfacTask, EvalTask  # noqa: E402
from untrac_ray.methods.workbench import Workbench  # noqa: E402

ROWS = {  # training sets of unequal sizes (6, 10, 24 rows), two test sets (5 and 7 rows)
    "add_one": [(f"What comes after {i}?", str(i + 1)) for i in range(6)],
    "double": [(f"Double the number {i}.", str(2 * i)) for i in range(10)],
    "spell": [(f"Spell the digits of {i}.", " ".join(str(i))) for i in range(24)],
    "same": [("Say it again.", "again")] * 12,  # identical rows: sampling must scale exactly
    "next_number": [(f"What number follows {i + 50}?", str(i + 51)) for i in range(5)],
    "twice": [(f"What is {i + 50} times two?", str(2 * (i + 50))) for i in range(7)],
}
TRAIN, TEST = ("add_one", "double", "spell"), ("next_number", "twice")


@pytest.fixture(scope="module")
def sets() -> dict[str, TokenizedSet]:
    tok = byte_level_tokenizer()
    spec = TokenizerSpec(max_length=40)
    out = {}
    for name, rows in ROWS.items():
        table = pa.table({"prompt": [p for p, _ in rows], "target": [t for _, t in rows]})
        out[name] = tokenize_rows(DatasetSpec(name=name, source=f"{name}.csv"), table, tok, spec)
    return out


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """A tiny Llama, randomly initialised (seeded), with the byte tokenizer's vocabulary."""
    config = config_from_dict({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    }, vocab_size=257, eos_id=256)
    return build_model(config, seed=0).eval()


def _all(data: TokenizedSet) -> np.ndarray:
    return np.arange(len(data))


def _tokens(data: TokenizedSet, rows: np.ndarray) -> int:
    return int((data.batch(rows)["labels"][:, 1:] != IGNORE_INDEX).sum())


def _linear_gradient(model, data: TokenizedSet, rows: np.ndarray, mean: bool) -> torch.Tensor:
    """Plain autograd, float64: the gradient of the rows' summed (or mean) token loss with
    respect to the weights kronfluence tracks (every nn.Linear), each for its module's own
    use of them: a head that shares the embedding matrix is untied first. The loss is the
    jobs' (modeling.logits_and_labels): the next-token shift of a causal LM, or an encoder-
    decoder's prompt to the encoder and target to the decoder."""
    from untrac_ray.compute.modeling import logits_and_labels

    model = copy.deepcopy(model).double()
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    logits, labels = logits_and_labels(model, data.batch(rows))
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    if mean:
        loss = loss / (labels != IGNORE_INDEX).sum()
    loss.backward()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return torch.cat([m.weight.grad.reshape(-1) for m in linears])


def _influence(model, sets, spec: EkfacSpec, train=TRAIN, test=TEST) -> dict:
    return ekfac_influence(copy.deepcopy(model), {n: (sets[n], _all(sets[n])) for n in train},
                           {n: (sets[n], _all(sets[n])) for n in test}, spec)


def _bench(model, sets, precision: str = "fp32") -> Workbench:
    indices = {n: _all(s) for n, s in sets.items()}
    return Workbench({"base": SharedWeights.from_model(model)}, sets, indices, 16,
                     precision=precision)


def test_identity_is_the_dataset_gradient_dot_product(llama, sets):
    """No preconditioning (kronfluence's identity strategy applies no damping): the score is
    the training set's summed-loss gradient . the test set's mean-loss gradient."""
    scores = _influence(llama, sets, EkfacSpec(strategy="identity", batch_size=8, aggregate="sum"))
    errors = []
    g_test = {q: _linear_gradient(llama, sets[q], _all(sets[q]), mean=True) for q in TEST}
    for t in TRAIN:
        g_train = _linear_gradient(llama, sets[t], _all(sets[t]), mean=False)
        for q in TEST:
            expected = float(g_train @ g_test[q])
            errors.append(abs(scores[(t, q)] - expected) / abs(expected))
            assert scores[(t, q)] == pytest.approx(expected, rel=1e-4)
    print(f"identity vs hand-computed: max relative error {max(errors):.2e}")


@pytest.fixture(scope="module")
def t5() -> torch.nn.Module:
    """A tiny T5, seeded. Its head shares the embedding matrix (transformers 5 ties T5's
    always): kronfluence scores the head's use of it, not the embedding lookups'."""
    config = config_from_dict({
        "model_type": "t5", "d_model": 32, "num_layers": 1, "num_decoder_layers": 1,
        "num_heads": 2, "d_kv": 16, "d_ff": 64,
    }, vocab_size=257, eos_id=256)
    model = build_model(config, seed=0).eval()
    assert model.lm_head.weight is model.shared.weight
    return model


def test_identity_is_the_dataset_gradient_dot_product_on_t5(t5, sets):
    """The same check on an encoder-decoder: EK-FAC's scores on T5 were only checked to be
    finite; with no preconditioning they are the dataset gradients' dot products, taken on
    the prompt/target split that every other method uses."""
    scores = _influence(t5, sets, EkfacSpec(strategy="identity", batch_size=8, aggregate="sum"))
    g_test = {q: _linear_gradient(t5, sets[q], _all(sets[q]), mean=True) for q in TEST}
    for t in TRAIN:
        g_train = _linear_gradient(t5, sets[t], _all(sets[t]), mean=False)
        for q in TEST:
            assert scores[(t, q)] == pytest.approx(float(g_train @ g_test[q]), rel=1e-4)


def test_mean_is_the_sum_over_the_training_sets_tokens(llama, sets):
    summed = _influence(llama, sets, EkfacSpec(strategy="identity", batch_size=16,
                                               aggregate="sum"))
    mean = _influence(llama, sets, EkfacSpec(strategy="identity", batch_size=16,
                                             aggregate="mean"))
    for t in TRAIN:
        tokens = _tokens(sets[t], _all(sets[t]))
        for q in TEST:
            assert mean[(t, q)] == pytest.approx(summed[(t, q)] / tokens, rel=1e-6)


def test_sampled_training_rows_are_scaled_to_the_whole_set(llama, sets):
    """max_train_examples scores a sample of the rows; the sum is scaled by the set's tokens
    over the sample's, so a set of 12 identical rows sampled 4 at a time scores as all 12."""
    full = _bench(llama, sets).run(
        EkfacTask(("same", "spell"), TEST, EkfacSpec(strategy="identity", batch_size=16,
                                                      aggregate="sum"))
    ).payload
    sampled = _bench(llama, sets).run(EkfacTask(
        ("same", "spell"), TEST,
        EkfacSpec(strategy="identity", batch_size=16, max_train_examples=4, aggregate="sum"),
    )).payload
    for q in TEST:
        assert sampled[("same", q)] == pytest.approx(full[("same", q)], rel=1e-4)
        # a set of similar rows sampled keeps the whole set's scale (not 4/24 of it)
        ratio = sampled[("spell", q)] / full[("spell", q)]
        print(f"spell sampled 4/24 over full, on {q}: {ratio:.3f}")
        assert 0.5 < ratio < 2


def test_ekfac_under_bf16_ranks_like_fp32_and_runs_the_copy_in_bf16(llama, sets):
    """EK-FAC as the actors run it: inside the Workbench's precision context. The deep copy
    kronfluence wraps really runs (a hook copied with it fires, in bf16 under bf16)."""
    seen: list[tuple[int, torch.dtype]] = []
    task = EkfacTask(TRAIN, TEST, EkfacSpec(batch_size=16))
    scores = {}
    for precision in ("fp32", "bf16"):
        bench = _bench(llama, sets, precision)
        hooked = bench.model.model.layers[0].mlp.down_proj
        hooked.register_forward_hook(lambda m, i, o: seen.append((id(m), o.dtype)))
        seen.clear()
        torch.manual_seed(0)  # kronfluence samples labels for the true Fisher
        scores[precision] = bench.run(task).payload
        copies = [dtype for ident, dtype in seen if ident != id(hooked)]
        assert copies, "the hooks of kronfluence's copy never fired"
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert set(copies) == {expected}
        assert all(p.dtype == torch.float32 for p in bench.model.parameters())
    print("EK-FAC scores fp32 / bf16:")
    for key in scores["fp32"]:
        print(f"  {key}: {scores['fp32'][key]:.6g} / {scores['bf16'][key]:.6g}")
    for precision, values in scores.items():
        assert all(np.isfinite(v) for v in values.values()), precision
        assert any(v != 0 for v in values.values()), precision
    for q in TEST:
        ranks = {p: sorted(TRAIN, key=lambda t, p=p: scores[p][(t, q)]) for p in scores}
        assert ranks["fp32"] == ranks["bf16"], q
    for key, value in scores["bf16"].items():  # bf16 forward passes only: close, not equal
        assert value == pytest.approx(scores["fp32"][key], rel=0.15)
        assert value != scores["fp32"][key]


def test_the_workbench_runs_tasks_in_its_precision(llama, sets):
    """bf16: a Linear's outputs are bfloat16 inside a task, float32 under fp32; the weights
    stay float32 either way, and the model's forward is not replaced."""
    for precision, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        bench = _bench(llama, sets, precision)
        dtypes = []
        bench.model.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda m, i, o, dtypes=dtypes: dtypes.append(o.dtype))
        bench.run(EvalTask(("twice",)))
        assert dtypes and set(dtypes) == {expected}
        assert all(p.dtype == torch.float32 for p in bench.model.parameters())
        assert "forward" not in vars(bench.model)
        dtypes.clear()
        bench.evaluate(("twice",))  # outside a task: the model's own float32
        assert set(dtypes) == {torch.float32}
    with pytest.raises(ValueError, match="precision"):
        _bench(llama, sets, "fp16")
