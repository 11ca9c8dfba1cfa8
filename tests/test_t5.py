"""Encoder-decoder models (T5): every method end to end, and UnTrac against a hand-written
seq2seq gradient-ascent loop that uses T5's own loss."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import merge, run_through_cli, tiny_spec
from untrac_ray.compute.modeling import (
    build_model,
    config_from_dict,
    label_count,
    load_model,
    token_losses,
)
from untrac_ray.compute.training import trained_model_dir
from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.loading import load_spec, parse_spec
from untrac_ray.inputs.preflight import check_job
from untrac_ray.inputs.tokenization import byte_level_tokenizer, tokenize_rows
from untrac_ray.results.tables import matrix

TINY_T5 = {
    "model_type": "t5", "d_model": 32, "num_layers": 1, "num_decoder_layers": 1,
    "num_heads": 2, "d_kv": 16, "d_ff": 64, "dropout_rate": 0.1,
}
TRAIN, TEST = ["add_one", "double", "spell"], ["next_number", "twice"]
ALL_METHODS = ["untrac", "untrac_inv", "ldo", "graddot", "gradcos", "tracin", "ekfac"]


def t5_spec(tmp: Path) -> dict:
    """The tiny job (fewer rows) with a tiny T5 (dropout on) and every method."""
    return merge(tiny_spec(tmp, n_train_rows=12, n_test_rows=8), {
        "name": "tiny_t5",
        "model": {"config": TINY_T5},
        "training": {"checkpoint_every": 3},
        "methods": {"ldo": {}, "graddot": {"batch_size": 16}, "gradcos": {"batch_size": 16},
                    "tracin": {"batch_size": 16}, "ekfac": {"batch_size": 8}},
    })


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, ray_cluster):
    """The tiny T5 job run through the CLI; its table read back from MLflow."""
    tmp = tmp_path_factory.mktemp("t5")
    return {**run_through_cli(tmp, t5_spec(tmp)), "tmp": tmp}


def test_every_method_gives_a_complete_finite_matrix_for_t5(t5_run):
    table = t5_run["table"]
    assert set(table.method) == set(ALL_METHODS)
    for method in ALL_METHODS:
        mat = matrix(table, method, None, TRAIN, TEST)
        assert mat.shape == (3, 2), method
        assert np.isfinite(mat.to_numpy(dtype=float)).all(), method


def _rows(path: Path, group: str) -> list[tuple[str, str]]:
    with path.open() as f:
        return [(r["prompt"], r["target"]) for r in csv.DictReader(f) if r["dataset"] == group]


def _seq2seq_batch(pairs: list[tuple[str, str]], tok) -> dict[str, torch.Tensor]:
    """Encoder: <eos-as-bos> prompt \\n; labels: target <eos> (padded: pad id / -100)."""
    eos = tok.eos_token_id
    enc = [[eos] + tok(p + "\n", add_special_tokens=False)["input_ids"] for p, _ in pairs]
    lab = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for _, t in pairs]
    width_e, width_l = max(map(len, enc)), max(map(len, lab))
    return {
        "input_ids": torch.tensor([e + [tok.pad_token_id] * (width_e - len(e)) for e in enc]),
        "attention_mask": torch.tensor([[1] * len(e) + [0] * (width_e - len(e)) for e in enc]),
        "labels": torch.tensor([x + [-100] * (width_l - len(x)) for x in lab]),
    }


def test_untrac_cell_equals_a_hand_written_seq2seq_ascent_loop(t5_run):
    spec = load_spec(t5_run["job"])
    settings = spec.methods.untrac
    tok = byte_level_tokenizer()
    model = load_model(str(trained_model_dir(spec)))  # the base model the job studied
    forget = _rows(t5_run["tmp"] / "train.csv", "add_one")
    test = _seq2seq_batch(_rows(t5_run["tmp"] / "test.csv", "next_number"), tok)

    def test_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**test).loss)  # T5's own mean over the target tokens

    before = test_loss()
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    order = np.random.default_rng(settings.seed).permutation(len(forget))  # one epoch
    model.train()  # dropout on, as in the job
    for start in range(0, len(forget), settings.batch_size):
        batch = _seq2seq_batch([forget[i] for i in order[start : start + settings.batch_size]],
                               tok)
        optimizer.zero_grad()
        (-model(**batch).loss).backward()
        optimizer.step()
    after = test_loss()

    table = t5_run["table"]
    cell = matrix(table, "untrac", None, TRAIN, TEST).loc["add_one", "next_number"]
    assert abs(after - before) > 1e-3  # the loop moved the model
    assert cell == pytest.approx(after - before, abs=1e-4)


def test_t5_splits_prompt_and_target_and_counts_the_same_tokens():
    tok = byte_level_tokenizer()
    config = config_from_dict(TINY_T5, len(tok), tok.eos_token_id)
    assert config.decoder_start_token_id == tok.pad_token_id  # not byte 0
    model = build_model(config).eval()
    rows = [("What comes after 7?", "8"), ("Hi", "hello there")]
    import pyarrow as pa

    from untrac_ray.inputs.spec_sections import DatasetSpec, TokenizerSpec

    data = tokenize_rows(DatasetSpec(name="d", source="d.csv"),
                          pa.table({"prompt": [p for p, _ in rows],
                                    "target": [t for _, t in rows]}),
                          tok, TokenizerSpec())
    batch = data.batch([0, 1])
    with torch.no_grad():
        sums, counts = token_losses(model, batch)
    assert int(counts.sum()) == label_count(batch) == 1 + 1 + 11 + 1
    for i, pair in enumerate(rows):  # each row alone through T5's own loss
        own = _seq2seq_batch([pair], tok)
        with torch.no_grad():
            expected = float(model(**own).loss) * own["labels"].shape[1]
        assert float(sums[i]) == pytest.approx(expected, rel=1e-5)


def test_t5_folder_loads_as_a_seq2seq_model(tmp_path):
    tok = byte_level_tokenizer()
    model = build_model(config_from_dict(TINY_T5, len(tok), tok.eos_token_id))
    model.save_pretrained(tmp_path / "t5")
    loaded = load_model(str(tmp_path / "t5"))
    assert loaded.config.is_encoder_decoder
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_t5_with_text_data_is_refused_in_one_line(tmp_path):
    spec = tiny_spec(tmp_path)
    text = {"data": {"train": [{"name": "corpus", "source": "train.csv", "kind": "text",
                                "text_column": "prompt"}]}}
    # the spec loads without transformers; validate and run refuse it before reading any data
    t5_config = parse_spec(merge(spec, {"model": {"config": TINY_T5}, **text}))
    with pytest.raises(SpecError, match="data.train: dataset 'corpus' is text") as err:
        check_job(t5_config)
    assert "\n" not in str(err.value)
    # a model folder (relative: resolved from the job's folder) is read by validate / run
    tok = byte_level_tokenizer()
    build_model(config_from_dict(TINY_T5, len(tok), tok.eos_token_id)).save_pretrained(
        tmp_path / "t5")
    folder = {"model": {"config": None, "path": "t5"}}
    job = tmp_path / "folder.yaml"
    job.write_text(yaml.safe_dump(merge(spec, {**folder, **text})))
    with pytest.raises(SpecError, match="data.train: dataset 'corpus' is text, but an enc"):
        check_job(load_spec(job))
    parse_spec(merge(spec, {"model": {"config": TINY_T5}}))  # prompt_target rows are fine
    parse_spec(merge(spec, text))  # and text is fine for a causal LM
