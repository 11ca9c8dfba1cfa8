"""A user's own model and data, as they arrive: a `save_pretrained` folder (a GPT-NeoX model with
the BPE tokenizer it was trained with, trained here in a second by the `tokenizers` library)
and corpora of text of unequal sizes as JSON Lines and Parquet, run with jobs/your_model.yaml
itself (copied beside them) through the CLI, with no tokenizer section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from untrac_ray.cli import app
from untrac_ray.results.runs import read_influence

JOB = Path(__file__).resolve().parents[1] / "jobs" / "your_model.yaml"
WORDS = ["river", "stone", "lamp", "garden", "signal", "market", "winter", "copper", "letter",
         "harbor", "thread", "engine", "meadow", "ladder", "candle", "orbit"]


def sentences(seed: int, n: int) -> list[str]:
    """n short sentences of the word list, deterministic."""
    out = []
    for i in range(n):
        words = [WORDS[(seed * 7 + i * 3 + k * 5) % len(WORDS)] for k in range(6 + i % 5)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def write_tokenizer_and_model(folder: Path, corpus: list[str], vocab: int | None = None):
    """A byte-level BPE trained on `corpus` and a tiny GPT-NeoX of its vocabulary (or of
    `vocab` ids), both saved with save_pretrained; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    eos = tok.eos_token_id
    config = GPTNeoXConfig(vocab_size=vocab or len(tok), hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos,
                           hidden_dropout=0.1, attention_dropout=0.1)  # on, as OPT's
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """jobs/your_model.yaml beside a model folder and data/: forum.jsonl (60 rows),
    wiki.parquet (15 rows), replies.jsonl (12 rows), all of them text."""
    tmp = tmp_path_factory.mktemp("your_model")
    shutil.copy(JOB, tmp / "job.yaml")
    (tmp / "data").mkdir()
    forum, wiki, replies = sentences(1, 60), sentences(2, 15), sentences(3, 12)
    (tmp / "data" / "forum.jsonl").write_text("".join(json.dumps({"text": s}) + "\n"
                                                      for s in forum))
    pq.write_table(pa.table({"text": wiki}), tmp / "data" / "wiki.parquet")
    (tmp / "data" / "replies.jsonl").write_text("".join(json.dumps({"text": s}) + "\n"
                                                        for s in replies))
    write_tokenizer_and_model(tmp / "model", forum + wiki + replies)
    return tmp


def test_the_job_runs_on_a_model_folder_with_its_own_tokenizer(folder, monkeypatch,
                                                                ray_cluster):
    spec = yaml.safe_load((folder / "job.yaml").read_text())
    assert "tokenizer" not in spec  # the shortest job: the model folder's tokenizer
    monkeypatch.chdir(folder)  # cache and store beside the job, as a user's first run
    runner = CliRunner()
    checked = runner.invoke(app, ["validate", "job.yaml"])
    assert checked.exit_code == 0, checked.output
    said = checked.output
    assert "kind: pretrained" in said and f"path: {folder / 'model'}" in said
    assert "model: gpt_neox at" in said and "tokenizer: the model folder's own" in said
    assert "data.train forum: 60 rows of text" in said and "data.train wiki: 15 rows" in said
    assert "untrac 2 tasks" in said and "untrac_inv 1 task" in said

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = runner.invoke(app, ["run", "job.yaml", "--tracking-uri", uri, "--quiet"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("untrac-ray").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenizer.kind"] == "pretrained"
    table = read_influence(run.info.run_id, uri)
    for method in ("untrac", "untrac_inv"):
        cells = table[table["method"] == method]
        assert set(zip(cells["train_set"], cells["test_set"], strict=True)) == {
            ("forum", "replies"), ("wiki", "replies")}
        assert cells["influence"].notna().all()
    assert (cells["loss_before"] < 7.0).all()  # ln(vocab) is about 6: its own tokens, no 0s
    # the folder's model has dropout on: its losses are measured with dropout off, as the
    # model is used; the test set's loss before unlearning, by hand with transformers
    untrac = table[(table["method"] == "untrac") & (table["test_set"] == "replies")]
    assert untrac["loss_before"].to_numpy() == pytest.approx(
        _eval_loss(folder / "model", sentences(3, 12), block=128), rel=1e-4)


def _eval_loss(model_dir: Path, texts: list[str], block: int) -> float:
    """The mean token loss of a text set, packed into blocks as `kind: text` packs it (each
    row's tokens then the end-of-text id; full blocks only, unless there is none), with the
    model in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stream = [i for t in texts for i in [*tok(t, add_special_tokens=False)["input_ids"],
                                         tok.eos_token_id]]
    full = len(stream) // block
    blocks = [stream[s:s + block] for s in range(0, full * block, block)] if full else [stream]
    total = count = 0.0
    with torch.no_grad():
        for ids in blocks:
            x = torch.tensor([ids])
            total += float(model(x, labels=x).loss) * (len(ids) - 1)
            count += len(ids) - 1
    return total / count


def test_a_byte_tokenizer_forced_on_a_50k_vocabulary_is_refused(tmp_path):
    """A GPT-NeoX folder of 50,304 embeddings with its own tokenizer: forcing the byte-level
    tokenizer on it is refused by validate in one line."""
    shutil.copy(JOB, tmp_path / "job.yaml")
    (tmp_path / "data").mkdir()
    for name in ("forum.jsonl", "replies.jsonl"):
        (tmp_path / "data" / name).write_text(json.dumps({"text": "A line."}) + "\n")
    pq.write_table(pa.table({"text": ["A line."]}), tmp_path / "data" / "wiki.parquet")
    write_tokenizer_and_model(tmp_path / "model", sentences(4, 20), vocab=50_304)
    spec = yaml.safe_load((tmp_path / "job.yaml").read_text())
    (tmp_path / "byte.yaml").write_text(yaml.safe_dump({**spec, "tokenizer": {"kind": "byte"}}))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "byte.yaml")])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "tokenizer.kind: byte has 257 token ids" in line
    assert "embeds 50304" in line and "tokenizer.json" in line
    # and a tokenizer with more ids than the model embeds
    write_tokenizer_and_model(tmp_path / "small", sentences(5, 20), vocab=64)
    small = {**spec, "model": {"path": "small"}}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "small.yaml")])
    assert result.exit_code == 2 and "embeds only 64" in result.output, result.output


def test_a_text_file_without_kind_text_gets_a_hint(tmp_path):
    (tmp_path / "replies.jsonl").write_text(json.dumps({"text": "Some words."}) + "\n")
    spec = yaml.safe_load(JOB.read_text())
    spec["model"] = {"config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8}}
    spec["data"] = {"train": [{"name": "a", "source": "replies.jsonl", "kind": "text"}],
                    "test": [{"name": "b", "source": "replies.jsonl"}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2
    assert "column 'prompt' not found" in result.output
    assert "needs `kind: text` on this dataset" in result.output
