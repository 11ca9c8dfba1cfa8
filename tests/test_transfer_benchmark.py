"""benchmarks/transfer.py's combination: per test set, each estimate's cells at its last point
standardized over the training sets, then averaged; so an estimate's scale does not let it
outweigh the others, and a candidate's earlier points do not count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import load_benchmark
from untrac_ray.calibrate.study import Draw

transfer = load_benchmark("transfer")


def _cells(method: str, values: dict[str, list[float]], point: int) -> list[dict]:
    return [{"method": method, "train_set": t, "test_set": test, "point": point,
             "influence": v}
            for test, column in values.items() for t, v in zip("abcd", column, strict=True)]


def test_the_combination_averages_standardized_cells_at_the_last_point():
    big = {"x": [100.0, 300.0, 200.0, 400.0], "y": [4.0, 3.0, 2.0, 1.0]}
    small = {"x": [0.4, 0.1, 0.3, 0.2], "y": [1.0, 2.0, 3.0, 4.0]}
    early = {"x": [9.0, 9.0, 9.0, -9.0], "y": [0.0, 0.0, 0.0, 1.0]}
    table = pd.DataFrame(_cells("u", early, 1) + _cells("u", big, 2) + _cells("g", small, 0))
    draw = Draw(1, list("abcd"), ["x", "y"], {}, table, None, None, None)
    combo = transfer.standardized(draw, ["u", "g"]).pivot_table(
        index="train_set", columns="test_set", values="influence")

    def z(v):
        v = np.asarray(v)
        return (v - v.mean()) / v.std()

    assert combo["x"].to_numpy() == pytest.approx((z(big["x"]) + z(small["x"])) / 2)
    assert combo["y"].to_numpy() == pytest.approx(np.zeros(4))  # opposite rankings cancel
    assert set(transfer.standardized(draw, ["u"])["method"]) == {transfer.COMBO}
