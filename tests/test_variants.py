"""Unlearning variants (issue 15): the retain term, the stopping rule by loss rise, seed
ensembles. Checked by hand on a Workbench, then once through a whole job."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from conftest import load_benchmark, merge, run_through_cli, tiny_spec
from untrac_ray.cli import app
from untrac_ray.compute.modeling import token_loss_sum
from untrac_ray.compute.unlearning import Retain
from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.loading import load_spec, parse_spec
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.cells import average_members
from untrac_ray.methods.plans import plan_unlearning
from untrac_ray.methods.schedule import eval_schedules
from untrac_ray.methods.tasks import TaskResult, UnlearnTask
from untrac_ray.methods.workbench import Workbench
from untrac_ray.results.scoring import agreement, agreement_of
from untrac_ray.results.task_store import decode, encode

TEST_SETS = ("next_number", "twice")


@pytest.fixture
def bench(bench_parts) -> Workbench:
    weights, sets, indices = bench_parts
    return Workbench({"base": weights}, sets, indices, eval_batch_size=16)


def _task(bench, forget, settings, retain=(), evaluate=TEST_SETS) -> UnlearnTask:
    schedule = eval_schedules(settings, {forget: len(bench.datasets[forget])})[forget]
    return UnlearnTask("untrac", forget, evaluate, settings, schedule, retain=retain)


def test_one_step_with_the_retain_term_is_ascent_plus_weighted_descent_by_hand(bench):
    """SGD, one step, dropout off: new weights = old - lr * (-grad L_forget + w grad L_kept)."""
    bench.model.config.resid_pdrop = 0.0
    for module in bench.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.1, batch_size=4, max_steps=1,
                           retain_weight=0.5, retain_batch_size=6, seed=3)
    kept = [bench.datasets["double"], bench.datasets["spell"]]
    # the rows the loop will draw: the same seeded streams
    forget_rows = np.random.default_rng(3).permutation(len(bench.datasets["add_one"]))[:4]
    retain_parts = Retain(kept, 0.5, 6, seed=3).draw()
    assert sum(len(r) for _, r in retain_parts) == 6

    def mean_loss(parts) -> torch.Tensor:
        sums, count = 0.0, 0
        for data, rows in parts:
            s, n = token_loss_sum(bench.model, data.batch(rows, "cpu"))
            sums, count = sums + s, count + n
        return sums / count

    bench.reset()
    bench.model.train()
    objective = -mean_loss([(bench.datasets["add_one"], forget_rows)]) + 0.5 * mean_loss(
        retain_parts)
    grads = torch.autograd.grad(objective, list(bench.model.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(bench.model.parameters(), grads,
                                                      strict=True)]
    bench.run(_task(bench, "add_one", settings, retain=("double", "spell")))
    for p, want in zip(bench.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_the_retain_term_keeps_the_other_sets_and_weight_zero_is_the_paper(bench):
    plain = UnlearnSpec(optimizer="adam", learning_rate=1e-2, batch_size=8, epochs=2)
    kept_sets = ("double", "spell")
    evaluate = (*TEST_SETS, *kept_sets)
    base = bench.evaluate(kept_sets)[0]
    paper = bench.run(_task(bench, "add_one", plain, evaluate=evaluate)).losses
    zero = bench.run(_task(bench, "add_one", plain.model_copy(update={"retain_weight": 0.0}),
                           retain=kept_sets, evaluate=evaluate)).losses
    assert zero == paper  # no retain term: the paper's UnTrac, to the bit
    kept = plain.model_copy(update={"retain_weight": 1.0})
    retained = bench.run(_task(bench, "add_one", kept, retain=kept_sets,
                               evaluate=evaluate)).losses
    last = max(paper)
    for name in kept_sets:  # the kept sets' losses rise less (or fall) with the retain term
        assert retained[last][name] - base[name] < paper[last][name] - base[name]


def test_the_stopping_rule_stops_at_the_first_check_past_the_rise(bench):
    settings = UnlearnSpec(optimizer="adam", learning_rate=3e-3, batch_size=4, max_steps=40,
                           stop_loss_rise=0.3, seed=1)
    base = bench.evaluate(("add_one",))[0]["add_one"]
    result = bench.run(_task(bench, "add_one", settings, evaluate=("add_one", *TEST_SETS)))
    stopped = int(result.payload["stopped_at"])
    assert 1 < stopped < 40
    (step,) = result.losses  # one point, keyed by the schedule's step
    assert result.losses[step]["add_one"] - base >= 0.3
    before = settings.model_copy(update={"max_steps": stopped - 1, "stop_loss_rise": None})
    short = bench.run(_task(bench, "add_one", before, evaluate=("add_one",))).losses
    assert short[stopped - 1]["add_one"] - base < 0.3  # one step earlier it had not risen enough
    # the cells report the step where it stopped
    from untrac_ray.methods.cells import influence_rows

    rows = influence_rows(result, {n: 0.0 for n in ("add_one", *TEST_SETS)})
    assert {r["step"] for r in rows} == {stopped} and {r["point"] for r in rows} == {1}


def test_a_stopped_run_is_stored_and_restored_with_its_step(bench):
    settings = UnlearnSpec(optimizer="adam", learning_rate=3e-3, batch_size=4, max_steps=40,
                           stop_loss_rise=0.3, seed=1)
    task = _task(bench, "add_one", settings)
    result = bench.run(task)
    again = decode(encode(result, "k"), task, "k")
    assert again.payload == {"stopped_at": float(result.payload["stopped_at"])}
    assert again.losses == result.losses


def test_an_ensemble_plans_one_task_per_seed_and_averages_its_cells(make_job):
    spec = load_spec(make_job({"methods": {"untrac": {"ensemble": 3, "seed": 5},
                                           "untrac_inv": None}}))
    plan = plan_unlearning(spec, "untrac", ["add_one", "double"], list(TEST_SETS),
                           {"add_one": 24, "double": 6})
    seeds = [(t.forget, t.settings.seed) for t in plan.tasks]
    assert seeds == [("add_one", 5), ("add_one", 6), ("add_one", 7),
                     ("double", 5), ("double", 6), ("double", 7)]
    cell = {"method": "untrac", "point": 1, "train_set": "a", "test_set": "b",
            "loss_before": 1.0}
    rows = [{**cell, "step": s, "influence": i, "loss_after": 1.0 + i}
            for s, i in ((4, 0.1), (6, 0.2), (5, 0.6))]
    (avg,) = average_members(rows)
    assert avg["influence"] == pytest.approx(0.3) and avg["loss_after"] == pytest.approx(1.3)
    assert avg["step"] == 5


def test_variants_are_checked_at_load(tmp_path):
    with pytest.raises(ValidationError, match="stop_loss_rise: a trajectory that stops"):
        UnlearnSpec(stop_loss_rise=0.5, eval_points=4)
    spec = parse_spec(merge(tiny_spec(tmp_path), {
        "data": {"test": [{"name": "next_number", "source": "test.csv",
                           "subset": "next_number"}]},
        "methods": {"untrac_inv": {"retain_weight": 1.0}}}), base_dir=tmp_path)
    with pytest.raises(SpecError, match="untrac_inv.retain_weight: the retain term descends on "
                                        "the other test sets, and there is only one"):
        plan_unlearning(spec, "untrac_inv", ["add_one", "double", "spell"], ["next_number"],
                        {"next_number": 16})
    searched = merge(tiny_spec(tmp_path), {
        "methods": {"untrac": {"ensemble": 2}, "ldo": {}},
        "search": {"space": {"untrac.learning_rate": [1e-3, 1e-2]}}})
    with pytest.raises(SpecError, match="methods.untrac.ensemble: `tune` runs the paper's"):
        parse_spec(searched, base_dir=tmp_path)


def test_a_job_with_every_variant_gives_a_complete_matrix(tmp_path, ray_cluster):
    spec = merge(tiny_spec(tmp_path), {"methods": {
        "untrac": {"retain_weight": 0.5, "ensemble": 2, "eval_every": None, "eval_points": 2},
        "untrac_inv": {"stop_loss_rise": 0.05, "max_steps": 6, "eval_steps": None,
                       "retain_weight": 1.0},
    }})
    got = run_through_cli(tmp_path, spec)
    table = got["table"]
    assert np.isfinite(table["influence"]).all()
    untrac = table[table.method == "untrac"]
    assert len(untrac) == 3 * 2 * 2  # 3 training x 2 test sets x 2 points, members averaged
    inverse = table[table.method == "untrac_inv"]
    assert len(inverse) == 3 * 2 and set(inverse.point) == {1}
    assert (inverse.step <= 6).all()
    assert got["run"].data.params["methods.untrac.ensemble"] == "2"
    # the trust signal: UnTrac against UnTrac-Inv, and the ensemble's seeds among themselves
    metrics = got["run"].data.metrics
    assert -1 <= metrics["agreement/untrac_vs_untrac_inv"] <= 1
    assert -1 <= metrics["agreement/untrac_seeds"] <= 1
    said = " ".join(got["output"].split())  # the verdict, whatever the line breaks
    assert "how far to trust it" in said and "UnTrac and UnTrac-Inv " in said
    assert "UnTrac's seeds " in said
    shown = CliRunner().invoke(app, ["show", got["run"].info.run_id, "--tracking-uri",
                                     got["uri"]], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "UnTrac and UnTrac-Inv " in " ".join(shown.output.split())


def test_agreement_by_hand():
    a = pd.Series([1.0, 2.0, 3.0], index=["x", "y", "z"])
    assert agreement_of([a, 2 * a]) == pytest.approx(1.0)
    assert agreement_of([a, -a, a]) == pytest.approx((-1 - 1 + 1) / 3)
    assert np.isnan(agreement_of([a]))
    rows = [{"method": m, "point": p, "train_set": k, "test_set": "t", "influence": v}
            for m, p, k, v in (("untrac", 1, "a", 9.0), ("untrac", 2, "a", 1.0),
                               ("untrac", 2, "b", 2.0), ("untrac", 1, "b", 0.0),
                               ("untrac_inv", 1, "a", -1.0), ("untrac_inv", 1, "b", -3.0))]
    table = pd.DataFrame(rows)
    # at the last points: untrac (1, 2) vs untrac_inv (-1, -3) disagree; at untrac's point 1
    # (9, 0) they agree
    assert agreement(table) == {"untrac_vs_untrac_inv": pytest.approx(-1.0)}
    assert agreement(table, {"untrac": 1}) == {"untrac_vs_untrac_inv": pytest.approx(1.0)}
    assert agreement(table[table.method == "untrac"]) == {}


def test_the_stored_result_type_is_unchanged_for_the_paper(bench):
    settings = UnlearnSpec(optimizer="sgd", learning_rate=0.1, batch_size=8)
    result = bench.run(_task(bench, "add_one", settings))
    assert isinstance(result, TaskResult) and result.payload is None


def test_the_selection_protocol_chooses_on_the_selection_seeds_only():
    module = load_benchmark("variants")
    rows = pd.DataFrame([
        # on selection seeds 1-2 "retain" is better; on report seed 3 "paper" would win
        {"job": "j", "pretrain_seed": 0, "seed": s, "method": "untrac", "variant": v,
         "pearson": p, "seconds": 1.0}
        for s, v, p in ((1, "paper", 0.5), (2, "paper", 0.6), (3, "paper", 0.99),
                        (1, "retain", 0.7), (2, "retain", 0.8), (3, "retain", 0.1))])
    assert module.choose(rows, [1, 2]) == {"untrac": "retain"}
    assert module.choose(rows, [3]) == {"untrac": "paper"}
    assert module.seconds_of({"graddot+gradcos": 5.0, "ldo": 9.0}, "gradcos") == 5.0


def test_the_targets_name_what_each_estimate_missed():
    module = load_benchmark("variants")
    draws = pd.MultiIndex.from_tuples([(0, 4), (1, 4), (0, 5)], names=["pretrain_seed", "seed"])
    opponents = pd.DataFrame({"tracin": [0.7, 0.8, 0.6], "gradcos": [0.5, 0.5, 0.5],
                              "ekfac": [0.85, 0.7, 0.8]}, index=draws)
    good = pd.Series([0.9, 0.85, 0.88], index=draws)
    assert module.targets(good, opponents, 0.1) == "PASS"
    assert module.targets(good, opponents, 0.3) == "MISS (cost)"
    # first draw below EK-FAC's 0.85: beaten, though the mean passes
    assert module.targets(pd.Series([0.84, 0.9, 0.9], index=draws), opponents, 0.1) == \
        "MISS (beaten)"
    assert module.targets(pd.Series([0.99, 0.99, 0.5], index=draws), opponents, 0.1) == \
        "MISS (std, beaten)"


def test_the_lds_report_chooses_by_lds_and_says_how_far_from_ekfac_paired(capsys):
    module = load_benchmark("variants")
    base = {"job": "text_corpora", "pretrain_seed": 0, "phase": "report", "ldo_seconds": 30.0,
            "ldo_n": 3, "lds_seconds": 40.0, "lds_ceiling": 0.95, "ldo_lds": 0.9,
            "pearson_low": 0.5, "pearson_high": 0.99, "lds_n": 20}
    rows = pd.DataFrame([
        {**base, "seed": s, "method": m, "variant": v, "pearson": p, "lds": lds,
         "lds_low": lds - 0.1, "lds_high": lds + 0.1, "lds_margin": lds,
         "lds_margin_low": lds - 0.2, "lds_margin_high": lds + 0.2, "vs_ekfac": vs,
         "vs_ekfac_low": vs - 0.1, "vs_ekfac_high": vs + 0.1, "seconds": sec}
        for s, m, v, p, lds, vs, sec in (
            (1, "untrac", "paper", 0.95, 0.5, -0.3, 1.0),
            (1, "untrac", "npo", 0.9, 0.7, -0.1, 1.0),
            (2, "untrac", "paper", 0.95, 0.55, -0.25, 1.0),
            (2, "untrac", "npo", 0.85, 0.75, -0.05, 1.0),
            (2, "ekfac", "paper", 0.99, 0.8, float("nan"), 1.0),
            (2, "random_cells", "paper", 0.0, 0.01, float("nan"), float("nan")))])
    assert module.choose(rows, [1], by="lds") == {"untrac": "npo"}
    assert module.choose(rows, [1], by="pearson") == {"untrac": "paper"}
    module.report_lds(rows, [2], {"untrac": "npo"})
    out = capsys.readouterr().out
    lines = out.splitlines()
    (npo,) = [line for line in lines if line.startswith("untrac + npo *")]
    (paper,) = [line for line in lines if line.startswith("untrac  ")]
    # npo: 0.05 below EK-FAC, the paired interval [-0.15, +0.05] reaches 0; Pearson misses
    assert "MISS (pearson +0.85 < 0.9)" in npo and "-0.05 [-0.15, +0.05]" in npo
    # the paper's: 0.25 below EK-FAC, beyond the paired interval [-0.35, -0.15]
    assert "LDS -0.25 below EK-FAC's, beyond the paired interval" in paper
    # the reference row is printed after the estimates, with no cost and no target
    assert lines.index(next(x for x in lines if x.startswith("random_cells"))) > \
        lines.index(npo)


def test_test_sets_group_into_the_test_set_they_are_subsets_of(tmp_path):
    spec = parse_spec(merge(tiny_spec(tmp_path), {"data": {"test": [
        {"name": "next_a", "source": "test.csv", "subset": "next_number", "group": "next"},
        {"name": "next_b", "source": "test.csv", "subset": "next_number", "group": "next"},
        {"name": "twice", "source": "test.csv", "subset": "twice"}]}}), base_dir=tmp_path)
    assert spec.data.test_groups() == {"next_a": "next", "next_b": "next"}
    with pytest.raises(SpecError, match="group: only test sets are grouped"):
        parse_spec(merge(tiny_spec(tmp_path), {"data": {"train": [
            {"name": "add_one", "source": "train.csv", "subset": "add_one", "group": "g"}]}}),
            base_dir=tmp_path)


def test_the_selection_table_is_printed_from_saved_rows_and_makes_the_choice(capsys):
    """--from-rows prints the selection table of the rows' selection draws: each variant's
    score per job, the pooled mean it is chosen by, and its seconds per job."""
    module = load_benchmark("variants")
    rows = pd.DataFrame([
        {"job": j, "pretrain_seed": 0, "seed": 1, "phase": "select", "method": m,
         "variant": v, "pearson": p, "lds": lds, "lds_low": lds - 0.1, "lds_high": lds + 0.1,
         "seconds": sec}
        for j, m, v, p, lds, sec in (
            ("a", "untrac", "paper", 0.9, 0.5, 10.0), ("b", "untrac", "paper", 0.5, 0.6, 20.0),
            ("a", "untrac", "stop", 0.8, 0.7, 30.0), ("b", "untrac", "stop", 0.4, 0.9, 40.0),
            ("a", "untrac_inv", "paper", 0.7, 0.4, 5.0))]
        + [{"job": "a", "pretrain_seed": 0, "seed": 4, "phase": "report", "method": "untrac",
            "variant": "paper", "pearson": 0.0, "lds": 0.0, "seconds": 1.0}])
    assert module.report_selection(rows, "lds") == {"untrac": "stop", "untrac_inv": "paper"}
    out = capsys.readouterr().out
    (stop,) = [line for line in out.splitlines() if line.startswith("untrac + stop *")]
    assert "+0.70 [+0.60, +0.80] / +0.80" in stop and "+0.80  30 / 40" in stop
    assert module.report_selection(rows, "pearson") == {"untrac": "paper",
                                                         "untrac_inv": "paper"}
    no_lds = rows.drop(columns=["lds", "lds_low", "lds_high"])
    assert module.report_selection(no_lds, "lds") == {"untrac": "paper", "untrac_inv": "paper"}
    assert module.report_selection(rows[rows["phase"] == "report"], "lds") == {}
