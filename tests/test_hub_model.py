"""A model named as users name it, by its Hugging Face Hub id (`model.path: org/name`, at
`model.revision`): a tiny GPT-2 saved with save_pretrained and laid out in a temporary Hugging
Face cache exactly as huggingface_hub lays it out (blobs, snapshots/<commit>, refs/main),
resolved offline (HF_HUB_OFFLINE=1, the Hub's client patched to fail if asked), keyed by its
commit, run end to end on the test Ray cluster, and pinned when a job is staged."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec
from untrac_ray.cli import app
from untrac_ray.inputs import hub
from untrac_ray.inputs.errors import ModelError, UntracError
from untrac_ray.inputs.fingerprints import results_key
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.preflight import check_job
from untrac_ray.inputs.redaction import redact
from untrac_ray.results.store import TAG_PREFIX

HUB_ID = "tiny-org/tiny-gpt2"
C1, C2 = "1" * 8 + "a" * 32, "2" * 8 + "b" * 32  # two commits of the repo
TOKEN = "hf_" + "Q" * 12 + "7" * 12 + "z" * 10  # the shape of a Hugging Face token


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Two save_pretrained folders of a 1-layer GPT-2 with the byte tokenizer (the second
    seeded otherwise: another commit's weights), and a folder with a config but no weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from untrac_ray.inputs.tokenization import byte_level_tokenizer

    out = {}
    tok = byte_level_tokenizer()
    for name, seed in (("v1", 0), ("v2", 1)):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32,
                            n_positions=64, bos_token_id=tok.eos_token_id,
                            eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    bare = tmp_path_factory.mktemp("bare")
    shutil.copy(out["v1"] / "config.json", bare / "config.json")
    out["bare"] = bare
    return out


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str,
                 ref: str | None = "main") -> Path:
    """Lay a model folder out as huggingface_hub does: file contents under blobs/ (named by
    their sha256), snapshots/<commit>/ of relative symlinks to them, refs/<ref> the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch, saved) -> Iterator[Path]:
    """A Hugging Face cache holding HUB_ID at C1 (refs/main) and C2, offline; the Hub's
    client fails the test if anything asks the network."""
    import huggingface_hub

    home = tmp_path / "hf"
    cache = home / "hub"
    put_in_cache(cache, HUB_ID, saved["v1"], C1)
    put_in_cache(cache, HUB_ID, saved["v2"], C2, ref=None)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    asked = []  # what reached the Hub's client (the resolution may catch what it raises)

    def no_network(*args, **kwargs):
        asked.append(args)
        raise AssertionError("the network was asked while HF_HUB_OFFLINE is set")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    yield cache
    assert not asked, "the Hub was asked while HF_HUB_OFFLINE is set"


def move_main(cache: Path, commit: str) -> None:
    (cache / ("models--" + HUB_ID.replace("/", "--")) / "refs" / "main").write_text(commit)


def hub_job(tmp_path: Path, override: dict | None = None) -> Path:
    """tiny_spec with the Hub model and its own tokenizer, untrac only, written as job.yaml."""
    spec = merge(tiny_spec(tmp_path), {
        "model": {"config": None, "path": HUB_ID}, "tokenizer": {"kind": None},
        "methods": {"untrac_inv": None, "untrac": {"max_steps": 2, "eval_steps": [1, 2],
                                                   "epochs": None, "eval_every": None}},
    })
    spec = merge(spec, override or {})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_hub_id_resolves_to_its_snapshot_and_commit(cache):
    snapshot = cache / "models--tiny-org--tiny-gpt2" / "snapshots"
    assert hub.resolve_hub_model(HUB_ID) == (str(snapshot / C1), C1)
    assert hub.resolve_hub_model(HUB_ID, "main") == (str(snapshot / C1), C1)
    assert hub.resolve_hub_model(HUB_ID, C2) == (str(snapshot / C2), C2)  # not on any ref
    assert hub.hub_commit(HUB_ID, "main") == C1


@pytest.mark.parametrize("path, hub_like", [
    ("EleutherAI/pythia-160m", True), ("gpt2", True), ("./model", False), ("/abs/model", False),
    ("~/model", False), ("s3://bucket/model", False), ("a/b/c", False), ("../model", False),
])
def test_what_looks_like_a_hub_id(path, hub_like):
    assert hub.looks_like_hub_id(path) is hub_like


def test_load_spec_keeps_the_id_and_the_tokenizer_follows_the_snapshot(cache, tmp_path):
    spec = load_spec(hub_job(tmp_path))
    assert spec.model.path == HUB_ID  # not made absolute from the job file's folder
    assert spec.model.revision == "main" and spec.tokenizer.path is None
    assert spec.tokenizer.kind == "pretrained"
    check_job(spec)  # the snapshot's config, weights and tokenizer pass preflight
    assert hub.model_folder(spec.model) == str(cache / "models--tiny-org--tiny-gpt2" /
                                               "snapshots" / C1)
    (tmp_path / "tiny-org").mkdir()  # a local folder of that name is a local path again
    shutil.copytree(cache / "models--tiny-org--tiny-gpt2" / "snapshots" / C1,
                    tmp_path / "tiny-org" / "tiny-gpt2", symlinks=False)
    local = load_spec(tmp_path / "job.yaml")
    assert local.model.path == str(tmp_path / "tiny-org" / "tiny-gpt2")
    assert local.tokenizer.path == local.model.path and hub.model_commit(local.model) is None


def test_a_revision_takes_a_branch_or_a_commit_and_only_with_a_hub_id(cache, tmp_path):
    for revision, commit in (("main", C1), (C1, C1), (C2, C2)):
        spec = load_spec(hub_job(tmp_path, {"model": {"revision": revision}}))
        assert hub.model_commit(spec.model) == commit
        assert hub.model_folder(spec.model).endswith(commit)
    with pytest.raises(UntracError, match=r"model: revision: only for a model named by a Hub"):
        load_spec(hub_job(tmp_path, {"model": {"path": "/abs/model", "revision": C1}}))


def test_what_is_not_in_the_cache_refuses_in_one_line(cache, tmp_path, saved, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ModelError) as missing:
        hub.resolve_hub_model("tiny-org/missing")
    assert str(missing.value).startswith(
        f"model.path: tiny-org/missing is not in the Hugging Face cache ({cache}) and "
        "HF_HUB_OFFLINE is set: ")
    with pytest.raises(ModelError) as revision:
        hub.resolve_hub_model(HUB_ID, "v9")
    assert str(revision.value).startswith(f"model.revision: 'v9' of {HUB_ID} is not in the "
                                          "Hugging Face cache")
    assert f"it holds main, {C1[:12]}, {C2[:12]}" in str(revision.value)
    put_in_cache(cache, "tiny-org/bare", saved["bare"], C1)
    with pytest.raises(ModelError, match=rf"^model.path: tiny-org/bare at {C1[:12]} .* has no "
                                         r"weights \(expected one of model.safetensors"):
        hub.resolve_hub_model("tiny-org/bare")
    spec = load_spec(hub_job(tmp_path, {"model": {"path": "tiny-org/missing"}}))
    with pytest.raises(ModelError) as through_preflight:
        check_job(spec)
    for err in (missing, revision, through_preflight):
        assert "\n" not in str(err.value) and TOKEN not in str(err.value)


def test_the_results_key_follows_the_commit_not_the_branch(cache, tmp_path):
    job = hub_job(tmp_path)
    on_c1 = results_key(load_spec(job))
    assert results_key(load_spec(job, [f"model.revision={C1}"])) == on_c1  # main is C1
    move_main(cache, C2)  # a new commit on main: another model, another key
    on_c2 = results_key(load_spec(job))
    assert on_c2 != on_c1
    assert results_key(load_spec(job, [f"model.revision={C2}"])) == on_c2
    # a job resolves its branch once: main moving under a running job does not move its key
    spec = load_spec(job)
    assert results_key(spec) == on_c2
    move_main(cache, C1)
    assert results_key(spec) == on_c2 and hub.model_folder(spec.model).endswith(C2)


def test_staging_pins_the_commit_and_carries_no_model_files(cache, tmp_path, monkeypatch):
    from untrac_ray.submit import staging

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    staged = staging.stage_job(hub_job(tmp_path))
    try:
        pinned = yaml.safe_load((staged.folder / staging.STAGED_SPEC).read_text())
        assert pinned["model"]["path"] == HUB_ID and pinned["model"]["revision"] == C1
        assert pinned["tokenizer"]["path"] is None
        assert not any(HUB_ID in p for p in staged.uploaded)  # the head resolves the id
        assert staged.secrets.get("HF_TOKEN") == TOKEN  # an environment variable of the job
        files = "".join(p.read_text(errors="ignore") for p in staged.folder.rglob("*")
                        if p.is_file())
        assert TOKEN not in files
        move_main(cache, C2)  # the head resolves the staged spec to the commit pinned here
        head = load_spec(staged.folder / staging.STAGED_SPEC)
        assert hub.model_folder(head.model).endswith(C1)
    finally:
        shutil.rmtree(staged.folder, ignore_errors=True)


def test_a_download_asks_for_the_commit_the_revision_names(cache, monkeypatch, saved):
    """Online: the Hub is asked which commit main names, and that commit (not main) is
    downloaded, config, tokenizer and safetensors only."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]
    asked = {}

    class Info:
        sha = C2
        siblings = [type("S", (), {"rfilename": f})() for f in files]

    def model_info(self, repo_id, revision=None, **kw):
        asked["info"] = (repo_id, revision)
        return Info()

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kw):
        asked["download"] = (repo_id, revision, cache_dir, allow_patterns)
        return str(Path(cache_dir) / "models--tiny-org--tiny-gpt2" / "snapshots" / revision)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder, commit = hub.resolve_hub_model(HUB_ID, "main")
    assert commit == C2 and folder.endswith(C2)
    assert asked["info"] == (HUB_ID, "main")
    repo, revision, where, patterns = asked["download"]
    assert (repo, revision, where) == (HUB_ID, C2, str(cache))
    assert "*.safetensors" in patterns and "*.bin" not in patterns


def test_a_hub_model_job_runs_end_to_end_with_its_commit_in_the_run(cache, tmp_path,
                                                                   monkeypatch, ray_cluster):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    job = hub_job(tmp_path)
    runner = CliRunner()
    checked = runner.invoke(app, ["validate", str(job)])
    assert checked.exit_code == 0, checked.output
    assert f"model: gpt2 from the Hub {HUB_ID} at {C1[:12]}" in checked.output
    assert "tokenizer: the model folder's own, 257 token ids" in checked.output
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["run", str(job), "--tracking-uri", uri, "--quiet"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["model.path"] == HUB_ID and params["model.revision"] == "main"
    assert params["model.commit"] == C1 and tags[TAG_PREFIX + "model_commit"] == C1
    assert tags[TAG_PREFIX + "model"] == HUB_ID
    for text in [*params.values(), *tags.values(), result.output, checked.output]:
        assert TOKEN not in text and "hf_" + "Q" * 12 not in text


def test_a_hugging_face_token_is_redacted_anywhere():
    assert redact(f"Authorization: Bearer {TOKEN}; dataset hf_disk") == (
        "Authorization: Bearer ***; dataset hf_disk")
