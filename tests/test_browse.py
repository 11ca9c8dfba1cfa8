"""Browsing results: `runs`, `show` and `compare` on runs of real tiny jobs (real SQLite store),
the figures each run logs, `ui`, and the run's page in the MLflow UI in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec
from untrac_ray.cli import app
from untrac_ray.inputs.loading import load_spec
from untrac_ray.results import plots
from untrac_ray.results.runs import read_influence, read_run_table
from untrac_ray.results.tables import matrix
from untrac_ray.run.runner import run_job

runner = CliRunner()
TRAIN, TEST = ["add_one", "double", "spell"], ["next_number", "twice"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_cluster):
    """Two real runs in one SQLite store: `tiny_full` (UnTrac, UnTrac-Inv and the ground truth,
    so it has scores, examples and scatter figures) and `tiny_proxy` (UnTrac-Inv only, another
    learning rate), nested under a `search` parent run as a tune search would."""
    tmp = tmp_path_factory.mktemp("browse")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    base = tiny_spec(tmp)
    specs = {
        "full": merge(base, {"name": "tiny_full", "methods": {"ldo": {}}}),
        "proxy": merge(base, {"name": "tiny_proxy", "methods": {
            "untrac": None, "untrac_inv": {"learning_rate": 0.02}}}),
    }
    ids = {}
    for key, spec in specs.items():
        path = tmp / f"{key}.yaml"
        path.write_text(yaml.safe_dump(spec))
        ids[key] = run_job(load_spec(path), uri).run_id
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tests")
    parent = client.create_run(exp.experiment_id, run_name="search",
                               tags={"untrac_ray.job": "search"})
    client.set_terminated(parent.info.run_id)
    client.set_tag(ids["proxy"], "mlflow.parentRunId", parent.info.run_id)
    ids["parent"] = parent.info.run_id
    return SimpleNamespace(
        uri=uri, tmp=tmp, ids=ids, client=client, experiment_id=exp.experiment_id,
        table={k: read_influence(ids[k], uri) for k in ("full", "proxy")},
        scores=read_run_table(ids["full"], uri, "score_table"),
        examples=read_run_table(ids["full"], uri, "examples/top_examples"),
    )


def cli(store, *args: str, code: int = 0):
    result = runner.invoke(app, [*args, "--tracking-uri", store.uri], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result


def sorted_matrix(table: pd.DataFrame, method: str, point: int | None = None) -> pd.DataFrame:
    """The matrix as `show` orders it: training sets by mean influence, highest first."""
    mat = matrix(table, method, point, TRAIN, TEST)
    return mat.loc[mat.mean(axis=1).sort_values(ascending=False, kind="stable").index]


# --- runs ----------------------------------------------------------------------------------------

def test_runs_piped_at_80_columns_and_on_an_80_column_terminal_reads_well(store):
    """Piped (not a terminal), every value is whole whatever COLUMNS says; on an 80-column
    terminal, optional columns go by priority and the kept ones are never crushed."""
    from rich.console import Console

    from untrac_ray.cli.render import runs_table
    from untrac_ray.results.runs import list_runs

    piped = runner.invoke(app, ["runs", "--tracking-uri", store.uri], env={"COLUMNS": "80"})
    assert piped.exit_code == 0, piped.output
    for run_id in store.ids.values():
        assert run_id in piped.stdout  # whole ids
    for word in ("tiny_full", "tiny_proxy", "FINISHED", "untrac, untrac_inv, ldo", "gpt2"):
        assert word in piped.stdout, word
    records = list_runs(store.uri)
    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    console.print(runs_table(records, "runs", width=80))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for word in ("tiny_full", "tiny_proxy", "FINISHED", "status", "job", "duration"):
        assert word in text, word  # whole, not cut to "…"
    assert "gpt2" not in text  # the model column went first


def test_runs_lists_untrac_runs_newest_first_in_text_and_every_format(store, tmp_path):
    ids = store.ids
    text = cli(store, "runs").stdout
    assert text.index(ids["parent"][:12]) < text.index(ids["proxy"][:12]) \
        < text.index(ids["full"][:12])  # newest first
    headline = dict(p.split("=") for p in store.client.get_run(ids["full"]).data.tags[
        "untrac_ray.headline_pearson"].split(","))
    top = max(headline, key=lambda m: float(headline[m]))
    for word in ("tiny_full", "tiny_proxy", "search", "FINISHED", "3 x 2", "gpt2",
                 f"{top} {float(headline[top]):+.3f}", "└ " + ids["parent"][:8]):
        assert word in text, word

    frame = pd.read_csv(io.StringIO(cli(store, "runs", "--format", "csv").stdout))
    assert frame.run_id.tolist() == [ids["parent"], ids["proxy"], ids["full"]]
    full = frame.set_index("job").loc["tiny_full"]
    assert full.methods == "untrac,untrac_inv,ldo" and (full.n_train, full.n_test) == (3, 2)
    best = store.client.get_run(ids["full"]).data.tags["untrac_ray.headline_pearson"]
    expected = max(float(p.split("=")[1]) for p in best.split(","))
    assert full.headline_pearson == pytest.approx(expected) and full.duration_s > 0
    assert frame.set_index("job").loc["tiny_proxy"].parent_run_id == ids["parent"]
    assert pd.isna(frame.set_index("job").loc["tiny_proxy"].headline_pearson)  # no truth

    data = json.loads(cli(store, "runs", "--format", "json").stdout)
    assert [r["run_id"] for r in data["runs"]] == frame.run_id.tolist()
    assert data["runs"][2]["methods"] == ["untrac", "untrac_inv", "ldo"]
    out = tmp_path / "runs.parquet"
    cli(store, "runs", "--format", "parquet", "-o", str(out))
    assert pd.read_parquet(out).run_id.tolist() == frame.run_id.tolist()

    only = json.loads(cli(store, "runs", "--format", "json", "--filter",
                          "tags.`untrac_ray.job` = 'tiny_full'").stdout)
    assert [r["run_id"] for r in only["runs"]] == [ids["full"]]
    assert "no experiment 'nope'" in cli(store, "runs", "-e", "nope", code=2).output
    assert "cannot search runs" in cli(store, "runs", "--filter", "what is this", code=2).output


# --- show ----------------------------------------------------------------------------------------

def test_show_prints_sorted_matrices_top_sets_scores_and_examples(store):
    table = store.table["full"]
    out = cli(store, "show", store.ids["full"], "--examples").stdout
    for heading in ("untrac: influence at point 3/3 (steps 1-3)",
                    "untrac_inv: influence at point 2/2 (step 2)", "ldo: influence, training"):
        assert heading in out
    section = out[out.index("untrac_inv: influence at point 2/2"):]
    rows = [name for name in TRAIN if name in section[:section.index("top 3")]]
    order = sorted(rows, key=lambda n: section.index(f"│ {n} "))
    assert order == list(sorted_matrix(table, "untrac_inv").index)  # rows by influence
    assert "untrac_inv at point 2/2 (step 2) vs the ground truth (leave-dataset-out)" in out
    assert "mean over test sets" in out and "best point, hindsight (Pearson)" in out
    assert "ldo (leave-dataset-out retraining) is the ground truth" in out
    best = store.examples.sort_values("loss_change").iloc[-1]
    assert best.text.splitlines()[0] in out  # the drill-down's rows are shown
    # where the figures are: an absolute folder of this (local) store, then their names
    folder = " ".join(out.split()).split("figures in ", 1)[1].split(": ", 1)[0]
    assert Path(folder).is_absolute() and (Path(folder) / "heatmap_ldo.png").is_file()
    assert "heatmap_ldo.png" in out
    assert "how far to trust it" in out and "over 3 training sets" in out
    assert "constant cells" in out and "random cells" in out  # the floor, in the table

    # by a prefix of the id, one method at one point, top-1
    out = cli(store, "show", store.ids["full"][:10], "-m", "untrac", "-p", "1", "-k", "1").stdout
    assert "untrac: influence at point 1/3 (step 1)" in out
    assert "untrac_inv:" not in out and "#2" not in out
    mat = sorted_matrix(table, "untrac", 1)
    assert f"{mat.iloc[0, 0]:+.4f}" in out


def test_show_formats_hold_the_logged_matrices(store, tmp_path):
    run, table = store.ids["full"], store.table["full"]
    cells = pd.read_csv(io.StringIO(cli(store, "show", run, "-m", "untrac_inv",
                                        "--format", "csv").stdout))
    assert list(cells.columns) == ["method", "point", "train_set", "test_set", "influence",
                                   "rank"]
    assert set(cells.point) == {2}
    got = cells.pivot(index="train_set", columns="test_set", values="influence")
    expected = matrix(table, "untrac_inv", 2, TRAIN, TEST)
    assert np.allclose(got.loc[TRAIN, TEST], expected)
    for _, part in cells.groupby("test_set"):
        assert part.sort_values("rank").influence.is_monotonic_decreasing

    data = json.loads(cli(store, "show", run, "-k", "2", "--format", "json", "--examples").stdout)
    assert [m["method"] for m in data["matrices"]] == ["untrac", "untrac_inv", "ldo"]
    inv = data["matrices"][1]
    mat = sorted_matrix(table, "untrac_inv")
    assert inv["train_sets"] == list(mat.index) and inv["test_sets"] == TEST
    assert np.allclose(inv["influence"], mat.to_numpy())
    for test_set in TEST:
        top = mat[test_set].sort_values(ascending=False).head(2)
        assert [t["train_set"] for t in inv["top"][test_set]] == list(top.index)
    logged = store.scores.query("method == 'untrac_inv' and point == 2 and score == 'pearson'"
                                ).set_index("test_set")
    names = {"mean over test sets": "__mean__", "all cells pooled": "__all__"}
    assert {row["test set"] for row in inv["scores"]} == {*TEST, *names}
    for row in inv["scores"]:
        want = logged.loc[names.get(row["test set"], row["test set"]), "value"]
        assert row["Pearson"] == pytest.approx(want)
    assert [r["method"] for r in data["scores"]][-2:] == ["constant cells", "random cells"]
    assert data["matrices"][2]["scores"] is None  # ldo is the truth itself
    assert data["examples"] and all(e["method"] == "untrac_inv" for e in data["examples"])
    known = set(zip(store.examples.test_set, store.examples.train_set, store.examples.text,
                    strict=True))
    assert {(e["test_set"], e["train_set"], e["text"]) for e in data["examples"]} <= known

    out = tmp_path / "cells.parquet"
    cli(store, "show", run, "--format", "parquet", "--output", str(out))
    every = pd.read_parquet(out)
    assert set(every.method) == {"untrac", "untrac_inv", "ldo"} and len(every) == 3 * 6
    json_file = tmp_path / "show.json"
    cli(store, "show", run, "--format", "json", "-o", str(json_file))
    assert json.loads(json_file.read_text())["run"]["run_id"] == run


def test_show_says_clearly_what_does_not_exist(store):
    run = store.ids["full"]
    missing = "0123456789abcdef0123456789abcdef"
    assert f"no run {missing}" in cli(store, "show", missing, code=2).output
    assert "no run 'nope'" in cli(store, "show", "nope", code=2).output
    out = cli(store, "show", run, "-m", "tracin", code=2).output
    assert "no results for method 'tracin' (it has: untrac, untrac_inv, ldo)" in out
    assert "method 'untrac' has no point 9 (points: 1, 2, 3)" in cli(
        store, "show", run, "-m", "untrac", "--point", "9", code=2).output
    assert "no method of the run has point 9" in cli(store, "show", run, "-p", "9",
                                                     code=2).output
    assert "give --output FILE" in cli(store, "show", run, "--format", "parquet", code=2).output
    assert "has no influence table" in cli(store, "show", store.ids["parent"], code=2).output
    # a run without a ground truth shows no scores, and says so
    out = cli(store, "show", store.ids["proxy"]).stdout
    assert "no scores against a ground truth" in out


# --- compare -------------------------------------------------------------------------------------

def test_compare_puts_two_matrices_side_by_side_with_their_correlation(store, tmp_path):
    full, proxy = store.ids["full"], store.ids["proxy"]
    table = store.table["full"]
    out = cli(store, "compare", full, full).stdout  # one run: UnTrac vs UnTrac-Inv
    assert "A: tiny_full" in out and "untrac @ 3" in out and "untrac_inv @ 2" in out
    a = matrix(table, "untrac", 3, TRAIN, TEST).to_numpy().ravel()
    b = matrix(table, "untrac_inv", 2, TRAIN, TEST).to_numpy().ravel()
    r = np.corrcoef(a, b)[0, 1]
    assert f"Pearson r over 6 shared cells: {r:+.3f}" in out

    data = json.loads(cli(store, "compare", full, proxy, "-m", "untrac_inv", "--format",
                          "json").stdout)
    assert (data["a"]["run_id"], data["b"]["run_id"]) == (full, proxy)
    a = matrix(table, "untrac_inv", 2, TRAIN, TEST)
    b = matrix(store.table["proxy"], "untrac_inv", 2, TRAIN, TEST)
    assert data["pearson"] == pytest.approx(np.corrcoef(a.to_numpy().ravel(),
                                                        b.to_numpy().ravel())[0, 1])
    cells = pd.read_csv(io.StringIO(cli(store, "compare", full, proxy, "--method-a",
                                        "untrac_inv", "--point-a", "1", "--format", "csv").stdout))
    assert len(cells) == 6
    got = cells.set_index(["train_set", "test_set"])
    for tr in TRAIN:
        for te in TEST:
            assert got.loc[(tr, te), "influence_a"] == pytest.approx(
                matrix(table, "untrac_inv", 1).loc[tr, te])
            assert got.loc[(tr, te), "influence_b"] == pytest.approx(b.loc[tr, te])
    out = tmp_path / "cmp.parquet"
    cli(store, "compare", full, full, "--method-b", "ldo", "--format", "parquet", "-o", str(out))
    assert np.allclose(pd.read_parquet(out).influence_b,
                       matrix(table, "ldo").stack().reindex(
                           pd.read_parquet(out).set_index(["train_set", "test_set"]).index))

    assert "same matrix" in cli(store, "compare", full, full, "-m", "untrac", code=2).output
    assert "B (run" in cli(store, "compare", full, proxy, "--method-b", "ldo", code=2).output
    assert "no run 'nope'" in cli(store, "compare", full, "nope", code=2).output


# --- figures -------------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_figures_are_logged_non_empty_and_draw_the_matrices(store):
    run, table = store.ids["full"], store.table["full"]
    names = {Path(a.path).name for a in store.client.list_artifacts(run, "figures")}
    assert names >= {"heatmap_untrac.png", "heatmap_untrac_inv.png", "heatmap_ldo.png",
                     "trajectory_untrac.png", "trajectory_untrac_inv.png",
                     "scatter_untrac.png", "scatter_untrac_inv.png"}
    for name in names:
        local = Path(store.client.download_artifacts(run, f"figures/{name}"))
        width, height = png_size(local)
        assert width > 200 and height > 150 and local.stat().st_size > 5000
    shown = json.loads(cli(store, "show", run, "--format", "json").stdout)
    for m in shown["matrices"]:
        fig = plots.heatmap(table, m["method"], TRAIN, TEST)
        assert fig.heatmap_rows == m["train_sets"]  # the order show prints them in
        assert np.allclose(fig.heatmap_values, m["influence"])  # = what show prints
    truth = matrix(table, "ldo", 0, TRAIN, TEST)
    top = store.scores.query("headline and score == 'pearson' and kind == 'estimate' "
                             "and test_set == '__mean__'")
    for r in top.itertuples():
        est = matrix(table, r.method, int(r.point), TRAIN, TEST)  # the headline point
        fig = plots.scatter_vs_truth(est, truth, r.method)
        pts = fig.scatter_points.set_index(["train_set", "test_set"])
        assert np.allclose(pts.estimate, est.stack().reindex(pts.index))
        assert np.allclose(pts.truth, truth.stack().reindex(pts.index))
        pooled = store.scores.query("method == @r.method and point == @r.point and score == "
                                    "'pearson' and test_set == '__all__'").value.item()
        assert fig.pearson == pytest.approx(pooled)
        assert f"{pooled:.3f}" in fig.axes[0].get_title()


def _visible_text_boxes(fig) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in fig.axes[0].texts if t.get_visible()]


def test_scatter_vs_truth_is_readable_with_many_cells():
    rng = np.random.default_rng(0)
    train = [f"train_set_{i}" for i in range(6)]
    test = [f"test_set_{j}" for j in range(4)]
    truth = pd.DataFrame(rng.normal(size=(6, 4)), index=train, columns=test)
    est = 0.5 * truth + rng.normal(scale=0.3, size=(6, 4))
    est.attrs.update(point=4, steps=[3, 12])  # as results.matrix labels a matrix
    fig = plots.scatter_vs_truth(est, truth.iloc[::-1], "untrac")  # truth gets aligned
    assert np.isclose(fig.pearson, np.corrcoef(est.to_numpy().ravel(),
                                               truth.to_numpy().ravel())[0, 1])
    ax = fig.axes[0]
    assert "UnTrac at point 4 (steps 3-12)" in ax.get_title() and "Pearson r" in ax.get_title()
    assert ax.get_xlabel().startswith("ground truth") and ax.get_ylabel().startswith("estimate")
    assert len(ax.collections) == len(test)  # one colour per test set, in the legend
    assert [t.get_text() for t in fig.legends[0].get_texts()] == test
    boxes = _visible_text_boxes(fig)  # the points' names: many shown, none overlapping
    assert len(boxes) >= 12
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    inside = ax.get_window_extent(fig.canvas.get_renderer())
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)
    # a constant estimate has no correlation: said, not crashed
    flat = plots.scatter_vs_truth(est * 0, truth, "untrac_inv")
    assert np.isnan(flat.pearson) and "n/a" in flat.axes[0].get_title()


# --- ui, and the run's page in a browser ---------------------------------------------------------

UI_PROCESS: dict[str, int] = {}  # the `untrac-ray ui` process of ui_server


@pytest.fixture(scope="module")
def ui_server(store):
    """`untrac-ray ui --port 0` in a subprocess; yields the address it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "untrac_ray.cli", "ui", "--tracking-uri", store.uri,
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the server answers
        assert line.startswith("MLflow UI: http://127.0.0.1:"), (line, proc.stderr.read()
                                                                  if proc.poll() else "")
        address = line.split()[2]
        UI_PROCESS["pid"] = proc.pid
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # the command stops the server it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    with pytest.raises(OSError):  # and nothing answers there any more
        urllib.request.urlopen(f"{address}/health", timeout=2)


def test_ui_serves_the_store_on_loopback(store, ui_server):
    with urllib.request.urlopen(ui_server, timeout=10) as reply:
        assert reply.status == 200 and b"<html" in reply.read().lower()
    url = (f"{ui_server}/ajax-api/2.0/mlflow/artifacts/list?run_id={store.ids['full']}"
           "&path=figures")
    with urllib.request.urlopen(url, timeout=10) as reply:
        files = {f["path"] for f in json.load(reply)["files"]}
    assert "figures/heatmap_untrac.png" in files
    # the store is named to the server by environment, never on a command line (`ps` shows
    # those to every user: a database URI's password would be there)
    import psutil

    def cmdline(p: psutil.Process) -> str:  # a worker may exit between listing and reading
        try:
            return " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return ""

    tree = psutil.Process(UI_PROCESS["pid"])
    lines = [cmdline(p) for p in tree.children(recursive=True)]
    assert any("mlflow" in line for line in lines)  # the server
    db = store.uri.removeprefix("sqlite:///")
    assert not [line for line in lines if db in line]


def test_ui_refuses_a_missing_store_and_a_busy_port(store, tmp_path):
    result = runner.invoke(app, ["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'no.db'}"])
    assert result.exit_code == 2 and "no MLflow store" in result.output
    assert not (tmp_path / "no.db").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["ui", "--tracking-uri", store.uri, "--port", str(port)])
    assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in result.output
    # a real server that cannot come up in its time limit (MLflow takes seconds): a clear line
    result = runner.invoke(app, ["ui", "--tracking-uri", store.uri, "--port", "0",
                                 "--start-timeout", "0.5"])
    assert result.exit_code == 1, result.output  # a failure while running, not bad input
    assert "starting the MLflow UI" in result.output
    assert "did not answer within 0.5 s" in result.output and "--start-timeout" in result.output


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.mark.e2e
def test_run_page_lists_the_heatmap_and_its_image_loads(store, ui_server, tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium is not installed: `make browser` (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) "
                                    "is not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    run = store.ids["full"]
    local = Path(store.client.download_artifacts(run, "figures/heatmap_untrac.png"))
    size = png_size(local)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(f"{ui_server}/#/experiments/{store.experiment_id}/runs/{run}"
                   "/artifacts/figures/heatmap_untrac.png")
        deadline, listed, loaded = time.monotonic() + 60, False, []
        while time.monotonic() < deadline:  # a React app: poll until it has rendered
            listed = bool(driver.find_elements(
                By.XPATH, "//*[normalize-space(text())='heatmap_untrac.png']"))
            loaded = driver.execute_script(
                "return Array.from(document.images).filter(i => i.complete && "
                "i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight]);")
            if listed and [*size] in loaded:
                break
            time.sleep(0.5)
        shot = tmp_path / "run_page.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert listed, "heatmap_untrac.png is not listed among the run's artifacts"
    assert [*size] in loaded, f"no loaded image of the heatmap's size {size}: {loaded}"


# --- report: one page of a run -------------------------------------------------------------------

class _Page(HTMLParser):
    """The report's numbers and images, read back from its HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.matrices: dict[str, list[list[float]]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.items: list[str] = []
        self._method = self._table = None
        self._row: list | None = None
        self._in_li = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a["data-name"]] = base64.b64decode(a["src"].split(",", 1)[1])
        elif tag == "div" and "data-method" in a:
            self._method = a["data-method"]
            self.matrices[self._method] = []
        elif tag == "table":
            self._table = a.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._row.append(a.get("data-value", ""))
        elif tag == "li":
            self._in_li = True
            self.items.append("")

    def handle_data(self, data):
        if self._in_li:
            self.items[-1] += data

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self.tables[self._table].append(self._row)
            if self._table == "matrix" and self._method:
                self.matrices[self._method].append([float(v) for v in self._row if v])
            self._row = None
        elif tag == "div":
            self._method = None
        elif tag == "li":
            self._in_li = False


def test_report_writes_one_page_with_the_figures_and_shows_numbers(store, tmp_path):
    run = store.ids["full"]
    page = tmp_path / "report.html"
    result = cli(store, "report", run, "--output", str(page))
    assert str(page) in " ".join(result.output.split())
    parsed = _Page()
    parsed.feed(page.read_text())
    # the figures, embedded: heatmaps, trajectories and scatters, each a real PNG
    assert {"heatmap_untrac", "heatmap_untrac_inv", "heatmap_ldo", "trajectory_untrac",
            "scatter_untrac"} <= set(parsed.images)
    for name, data in parsed.images.items():
        assert data.startswith(b"\x89PNG"), name
        local = tmp_path / f"{name}.png"
        local.write_bytes(data)
        assert png_size(local)[0] > 200
    # each matrix's numbers are show's, in show's order
    shown = json.loads(cli(store, "show", run, "--format", "json").stdout)
    for m in shown["matrices"]:
        assert np.allclose(parsed.matrices[m["method"]], m["influence"]), m["method"]
    # the headline scores, the agreement between methods, the verdict, the job
    # the page's score rows are show's, in show's order, the reference rows among them
    assert [r["method"] for r in shown["scores"]][-2:] == ["constant cells", "random cells"]
    page_rows = parsed.tables["scores"]
    assert len(page_rows) == len(shown["scores"])
    for want, row in zip(shown["scores"], page_rows, strict=True):
        assert float(row[1]) == pytest.approx(want["Pearson"]), want["method"]
    assert parsed.tables["agreement"] and parsed.tables["examples"]
    assert any("over 3 training sets" in item for item in parsed.items)
    assert shown["trust"] == [" ".join(item.split()) for item in parsed.items]
    assert "methods:" in page.read_text() and "untrac_inv" in page.read_text()


@pytest.mark.e2e
def test_the_report_draws_its_figures_in_a_browser(store, tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium is not installed: `make browser` (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) "
                                    "is not installed")
    from selenium.webdriver.chrome.service import Service

    page = tmp_path / "report.html"
    cli(store, "report", store.ids["full"], "--output", str(page))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.as_uri())
        drawn = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);")
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    print(f"screenshot: {shot}")
    assert len(drawn) >= 5 and all(drawn), drawn
    assert shot.stat().st_size > 10_000
