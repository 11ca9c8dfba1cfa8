"""Checks of a job's inputs and cache before any work starts (`validate`, and `run` first).

A spec that parses can still name things that are not there: a data file, a column, a
subset, model weights, a tokenizer, a cache folder that cannot be written. On a cluster each
of these fails only after minutes of start-up (Ray workers, MLflow, tokenizing), with a long
traceback. `check_job` finds them in a second and raises one clear line (an UntracError).

What is read: `run` checks that each dataset's shards exist and their headers (Parquet
footers, a CSV header, the first lines of JSON Lines: `check_dataset_header`); it reads the
rows anyway when it tokenizes them. `validate` also surveys each set (survey.py: rows from
metadata or estimated from the first MB of a few shards, and a few thousand rows), which says
how big it is and finds empty sets and missing subsets in seconds whatever its size. The
model folder and tokenizer folder are listed, not loaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from untrac_ray.inputs.data import check_dataset_header
from untrac_ray.inputs.errors import DataError, SpecError
from untrac_ray.inputs.hub import model_folder
from untrac_ray.inputs.model_folder import (
    check_model_folder,
    encoder_decoder_refusal,
    folder_config,
    folder_is_encoder_decoder,
    is_encoder_decoder,
    vocab_size,
)
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import DatasetSpec, is_uri
from untrac_ray.inputs.survey import SetSurvey, survey_dataset

BYTE_VOCAB = 257  # the byte-level tokenizer's ids: 256 bytes and <|endoftext|>
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_job(spec: JobSpec, survey: bool = True, exact: bool = False
              ) -> dict[str, SetSurvey]:
    """Raise an UntracError (one line, naming the key) for what the job would fail on.

    Checks every dataset (data.train, data.test, pretraining.data; with `survey`, surveyed:
    their rows, counted exactly with `exact`), the model folder (model.path; a Hub id resolved
    to its snapshot folder), the tokenizer folder (tokenizer kind pretrained) and cache_dir.
    Returns the surveys, by dataset name.
    """
    text = spec.text_datasets()
    if text and spec.model.config is not None and is_encoder_decoder(spec.model.config):
        raise SpecError(encoder_decoder_refusal(*text[0]))  # before reading any data
    roles = [("data.train", spec.data.train), ("data.test", spec.data.test)]
    if spec.pretraining is not None:
        roles.append(("pretraining.data", spec.pretraining.data))
    surveys: dict[str, SetSurvey] = {}
    for key, datasets in roles:
        for ds in datasets:
            found = check_dataset(ds, key, survey, exact)
            if found is not None:
                surveys[ds.name] = found
    folder = model_folder(spec.model)
    if folder is not None:
        check_model_folder(folder)
        if text and folder_is_encoder_decoder(folder):
            raise SpecError(encoder_decoder_refusal(*text[0]))
    if spec.tokenizer.kind == "pretrained":
        check_tokenizer_folder(spec.tokenizer.path or folder)
    if spec.model.path is not None:
        check_tokenizer_fits(spec)
    if spec.cache_dir is not None:
        check_cache_dir(spec.cache_dir)
    return surveys


def check_dataset(ds: DatasetSpec, key: str, survey: bool = True, exact: bool = False
                  ) -> SetSurvey | None:
    """Raise DataError, prefixed with the spec key (e.g. data.test), unless `ds` can be read;
    with `survey`, its survey (survey.py)."""
    try:
        if not survey:
            check_dataset_header(ds)
            return None
        return survey_dataset(ds, exact=exact)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None


def check_tokenizer_folder(path: str | None) -> None:
    """Raise SpecError unless `path` is a folder holding tokenizer files."""
    if not path or not Path(path).is_dir():
        raise SpecError(f"tokenizer.path: tokenizer folder not found: {path}")
    if not any(Path(path, f).is_file() for f in TOKENIZER_FILES):
        raise SpecError(
            f"tokenizer.path: {path} has no tokenizer files "
            f"(expected one of {', '.join(TOKENIZER_FILES)})"
        )


def check_tokenizer_fits(spec: JobSpec) -> None:
    """Raise SpecError unless the tokenizer's ids are the ones the model folder embeds: the
    byte-level tokenizer only for a model of the byte vocabulary (one this tool built from
    model.config), and a pretrained one with no id beyond the model's embeddings. A model
    read with another tokenizer than its own gives losses on text it never saw that way."""
    path = model_folder(spec.model)
    config = folder_config(path)
    size = vocab_size(config)
    if size is None:
        return
    if spec.tokenizer.kind == "byte":
        if size != BYTE_VOCAB:
            own = [f for f in TOKENIZER_FILES if Path(path, f).is_file()]
            has = f"; its own tokenizer is in the folder ({own[0]})" if own else ""
            raise SpecError(
                f"tokenizer.kind: byte has {BYTE_VOCAB} token ids, but the model at {path} "
                f"embeds {size}{has}: leave the tokenizer section out to use the model's "
                "own, or name its tokenizer folder with kind: pretrained")
        return
    from untrac_ray.inputs.tokenization import load_tokenizer

    tokens = len(load_tokenizer(spec.tokenizer, path))
    if tokens > size:
        raise SpecError(
            f"tokenizer.path: the tokenizer at {spec.tokenizer.path or path} has {tokens} "
            f"token ids, but the model at {path} embeds only {size}: ids from {size} on have "
            "no embedding; use the tokenizer the model was trained with")


def check_cache_dir(path: str) -> None:
    """Raise SpecError unless cache_dir is (or can be made) a folder this process can write.

    Folders that are missing are created to try, then removed again (a run creates them
    when it needs them). A URI is not checked.
    """
    if is_uri(path):
        return
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"cache_dir: {path} is a file, not a folder")
    missing = []
    parent = folder
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise SpecError(f"cache_dir: cannot create {path}: {parent} is a file, not a folder")
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpecError(f"cache_dir: cannot create {path}: {_reason(err)}") from None
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise SpecError(f"cache_dir: {path} is not writable: {_reason(err)}") from None
    finally:
        for made in missing:  # innermost first; keep any that another process filled
            try:
                made.rmdir()
            except OSError:
                break


def _reason(err: OSError) -> str:
    """The system's words for an OSError (e.g. 'Permission denied'), without the path."""
    return err.strerror or str(err) or type(err).__name__
