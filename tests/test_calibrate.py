"""`untrac-ray calibrate`: a proxy of the user's job (a model folder with its own BPE tokenizer
and text corpora, jobs/your_model.yaml's shape) trained, retrained for the ground truth, every
candidate scored; the choice made on the selection draws only, reported on held-out ones; a
SIGKILL mid-calibration resumed by the same command without redoing finished units; the job
file it writes accepted by validate and cited by the verdict of its run. Real processes, a
real store, a real Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_your_model import JOB, sentences, write_tokenizer_and_model
from typer.testing import CliRunner

from untrac_ray.calibrate.choice import decide
from untrac_ray.calibrate.proxy import proxy_spec, shrink_config
from untrac_ray.cli import app
from untrac_ray.inputs.fingerprints import results_key
from untrac_ray.inputs.loading import load_spec, parse_spec
from untrac_ray.results.calibration import read_calibration
from untrac_ray.results.runs import read_run_table
from untrac_ray.results.verdict import calibration_line, verdict

ARGS = ["--preset", "tiny", "--lds-subsets", "4", "--lds-noise", "0",
        "--candidates", "untrac,untrac+stop,graddot"]


def _jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def folder(tmp_path) -> Path:
    """jobs/your_model.yaml with four training sets (the LDS needs four or more): forum,
    news and mail as JSON Lines, wiki as Parquet; replies the test set; a GPT-NeoX folder with
    its own BPE tokenizer."""
    shutil.copy(JOB, tmp_path / "job.yaml")
    (tmp_path / "data").mkdir()
    texts = {name: sentences(seed, n) for seed, (name, n) in enumerate(
        [("forum", 40), ("wiki", 20), ("replies", 12), ("news", 30), ("mail", 25)], start=1)}
    for name in ("forum", "replies", "news", "mail"):
        _jsonl(tmp_path / "data" / f"{name}.jsonl", texts[name])
    pq.write_table(pa.table({"text": texts["wiki"]}), tmp_path / "data" / "wiki.parquet")
    raw = yaml.safe_load((tmp_path / "job.yaml").read_text())
    raw["data"]["train"] += [{"name": n, "source": f"data/{n}.jsonl", "kind": "text"}
                             for n in ("news", "mail")]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_tokenizer_and_model(tmp_path / "model", [t for v in texts.values() for t in v])
    return tmp_path


def _units(store: Path) -> list[Path]:
    return sorted(store.glob("mlartifacts/**/units/*/*.json"))


def test_calibrate_resumes_after_sigkill_and_its_job_file_is_cited(folder, ray_cluster,
                                                                    monkeypatch):
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    command = [sys.executable, "-m", "untrac_ray", "calibrate", "job.yaml", *ARGS,
               "--tracking-uri", uri]
    proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.time() + 240
        while not _units(folder) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert _units(folder), proc.communicate()[0].decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    first = [p.name for p in _units(folder)]
    assert first == ["ground_truth.json"]  # the draw's first job finished, the rest had not

    runner = CliRunner()
    monkeypatch.chdir(folder)  # the cache beside the job, as the killed driver had it
    result = runner.invoke(app, ["calibrate", "job.yaml", *ARGS, "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "draw 1, ground truth: finished earlier" in result.output

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("untrac_ray.kind") == "calibration"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same run, ended
    parent = parents[0].info.run_id
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    labels = sorted((r.data.tags["untrac_ray.draw"], r.data.tags["untrac_ray.candidate"])
                    for r in nested)
    # draw 1's ground truth ran once (read back on the second start), every unit once
    assert labels == [("1", "ground truth"), ("1", "untrac+stop"), ("2", "ground truth"),
                      ("2", "untrac+stop")]
    assert all(r.info.status == "FINISHED" for r in nested if r.data.tags[
        "untrac_ray.candidate"] == "ground truth" or r.data.tags["untrac_ray.draw"] == "2")

    scores = read_run_table(parent, uri, "calibration_scores")
    assert set(scores["candidate"]) == {"untrac", "untrac+stop", "graddot"}
    assert set(zip(scores["seed"], scores["phase"], strict=True)) == {(1, "select"),
                                                                       (2, "report")}
    summary = read_calibration(parent, uri)
    select = scores[scores["phase"] == "select"].set_index("candidate")["lds_value"]
    assert select[summary["chosen"]] == select.max()  # chosen on the selection draw

    written = folder / "job.calibrated.yaml"
    text = written.read_text()
    assert text.startswith("# Written by `untrac-ray calibrate job.yaml`")
    raw = yaml.safe_load(text)
    chosen_method = summary["method"]
    assert list(raw["methods"]) == [chosen_method]
    assert raw["calibration"]["run_id"] == parent
    checked = runner.invoke(app, ["validate", "job.calibrated.yaml"])
    assert checked.exit_code == 0, checked.output
    ran = runner.invoke(app, ["run", "job.calibrated.yaml", "--tracking-uri", uri, "--quiet"])
    assert ran.exit_code == 0, ran.output
    said = " ".join(ran.output.split())
    assert " ".join(str(calibration_line(summary)).split()) in said  # the verdict cites it
    job_run = [r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("untrac_ray.calibration_run") == parent]
    assert len(job_run) == 1
    shown = runner.invoke(app, ["show", job_run[0].info.run_id, "--tracking-uri", uri])
    assert shown.exit_code == 0, shown.output
    assert "on a proxy of this job" in " ".join(shown.output.split())
    of_parent = runner.invoke(app, ["show", parent, "--tracking-uri", uri])
    assert of_parent.exit_code == 0, of_parent.output  # its candidates and its choice
    assert "held-out LDS" in of_parent.output and "chosen" in of_parent.output


def test_the_choice_is_made_on_the_selection_draws_only():
    """A candidate best on the held-out draw but not on the selection draw is not chosen; it
    is named as the next best there."""
    def row(seed, phase, name, lds):
        return {"seed": seed, "phase": phase, "candidate": name, "method": name.split("+")[0],
                "lds_value": lds, "lds_low": lds - 0.1, "lds_high": lds + 0.1,
                "lds_margin_low": 0.2, "lds_ceiling": 0.9}
    rows = pd.DataFrame([row(1, "select", "untrac+stop", 0.8), row(1, "select", "graddot", 0.5),
                         row(1, "select", "tracin", 0.9),
                         row(2, "report", "untrac+stop", 0.4), row(2, "report", "graddot", 0.9),
                         row(2, "report", "tracin", 0.95)])
    summary = decide(rows, [], ["untrac+stop", "graddot"])  # tracin: the job cannot run it
    assert summary["chosen"] == "untrac+stop"
    assert summary["value"] == pytest.approx(0.4) and summary["next"] == "tracin"
    assert [r["candidate"] for r in summary["ranking"]][0] == "tracin"


def test_the_verdict_cites_a_calibration():
    summary = {"chosen": "untrac+kl+stop", "score": "lds", "value": 0.71, "low": 0.52,
               "high": 0.83, "margin_low": 0.3, "next": "ekfac", "difference": 0.08,
               "difference_low": 0.01, "difference_high": 0.15}
    (line,) = verdict({}, None, summary)
    assert str(line) == ("on a proxy of this job, UnTrac + kl + stop predicted retraining "
                         "best: LDS +0.71 [+0.52, +0.83], ahead of EK-FAC by +0.08 "
                         "[+0.01, +0.15]")
    close = calibration_line({**summary, "difference_low": -0.02})
    assert "not told apart" in close
    nothing = calibration_line({**summary, "margin_low": -0.1})
    assert nothing.warning and "no estimate was distinguishable" in nothing


def test_the_proxy_shrinks_each_family_and_does_not_depend_on_the_target_size(tmp_path):
    """The proxy of a job is the same for a target 4x larger: calibration's cost follows the
    proxy, not the target."""
    gpt2 = shrink_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                          "n_inner": None, "architectures": ["GPT2LMHeadModel"]},
                         {"hidden": 64, "layers": 2, "heads": 4})
    assert (gpt2["n_embd"], gpt2["n_layer"], gpt2["n_head"]) == (64, 2, 4)
    assert "architectures" not in gpt2
    opt = shrink_config({"model_type": "opt", "hidden_size": 768, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "ffn_dim": 3072,
                         "word_embed_proj_dim": 768}, {"hidden": 64, "layers": 2, "heads": 4})
    assert (opt["ffn_dim"], opt["word_embed_proj_dim"]) == (256, 64)
    jobs = []
    for hidden in (128, 256):
        raw = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "text_corpora.yaml")
                             .read_text())
        raw["model"]["config"]["hidden_size"] = hidden
        raw["model"]["config"]["intermediate_size"] = 4 * hidden
        jobs.append(parse_spec(raw, base_dir=Path(__file__).parents[1] / "jobs"))
    proxies = [proxy_spec(s, "tiny", sample_rows=50) for s in jobs]
    assert results_key(proxies[0]) == results_key(proxies[1])
    assert proxies[0].model.config["hidden_size"] == 64
    assert all(d.sample_rows == 50 for d in proxies[0].data.train)
    assert results_key(jobs[0]) != results_key(jobs[1])


@pytest.mark.parametrize("args, said", [
    (["--candidates", "untrac,bogus"], "--candidates: unknown bogus"),
    (["--select-seeds", "1,2", "--report-seeds", "2"], "must not share a seed"),
    (["--preset", "huge"], "--preset: unknown 'huge'"),
    (["--set", "data.train=[{name: a, source: data/forum.jsonl, kind: text}]"],
     "needs at least 4"),
])
def test_bad_calibrate_options_are_refused_in_one_line(folder, args, said):
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(app, ["calibrate", "job.yaml", *args, "--tracking-uri",
                                          f"sqlite:///{folder / 'm.db'}"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2, result.output
    assert said in result.output and len(result.output.strip().splitlines()) == 1
    assert not (folder / "m.db").exists() or not list(folder.glob("mlartifacts/*/*"))
    assert load_spec(folder / "job.yaml")  # the user's job untouched


def test_a_proxy_model_is_fine_tuned_on_the_jobs_sets_with_its_own_tokenizer(folder,
                                                                              monkeypatch):
    """--proxy-model FOLDER (a path relative to where the command runs): that model, fine-tuned
    (so that it can be retrained), its own tokenizer, the training sets sampled."""
    monkeypatch.chdir(folder)
    spec = load_spec(folder / "job.yaml")
    proxy = proxy_spec(spec, proxy_model="model", sample_rows=30)
    assert proxy.model.path == str(folder / "model") and proxy.model.finetune
    assert proxy.tokenizer.kind == "pretrained" and proxy.tokenizer.path == str(folder / "model")
    assert [d.sample_rows for d in proxy.data.train] == [30] * 4
    assert [d.name for d in proxy.data.test] == [d.name for d in spec.data.test]
    built = proxy_spec(spec, "tiny")  # from the folder's config.json, its family kept
    assert built.model.config["model_type"] == "gpt_neox"
    assert built.model.config["hidden_size"] == 64 and built.tokenizer.path == str(folder / "model")
