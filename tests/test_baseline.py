"""Baseline statistics (mlpipe/baseline.py) and their place in a trained version (train.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mlpipe import artifact, baseline as bl
from conftest import EXAMPLES


def frame(n: int = 5000, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.normal(shift, 1, n), "k": rng.integers(0, 4, n),
                         "colour": rng.choice(["red", "green", "blue"], n, p=[0.5, 0.3, 0.2]),
                         "flag": rng.random(n) < 0.3})


def test_numeric_and_categorical_statistics():
    X = frame()
    X.loc[:9, "x"] = np.nan
    X.loc[:4, "colour"] = None
    b = bl.compute(X, np.array([0, 1, 1, 0] * 25), "classification")
    x = b["features"]["x"]
    assert x["kind"] == "numeric" and len(x["edges"]) == bl.BINS - 1 and len(x["proportions"]) == bl.BINS
    assert x["missing"] == pytest.approx(10 / 5000)
    assert sum(x["proportions"]) + x["missing"] == pytest.approx(1.0)
    assert len(x["sample"]) == bl.SAMPLE and abs(x["mean"]) < 0.1 and 0.9 < x["std"] < 1.1
    k = b["features"]["k"]  # few distinct values: the edges collapse onto them
    assert k["edges"] == [0.0, 1.0, 2.0, 3.0] and k["proportions"][-1] == 0 and sum(k["proportions"]) == pytest.approx(1.0)
    c = b["features"]["colour"]
    assert c["kind"] == "categorical" and set(c["proportions"]) == {"red", "green", "blue"}
    assert c["missing"] == pytest.approx(5 / 5000) and c["other"] == 0
    assert b["features"]["flag"]["kind"] == "categorical"  # booleans are two categories, not a scale
    assert set(b["features"]["flag"]["proportions"]) == {"True", "False"}
    assert b["prediction"] == {"kind": "categorical", "rows": 100, "proportions": {"0": 0.5, "1": 0.5},
                               "other": 0.0, "missing": 0.0}


def test_top_categories_and_other():
    X = pd.DataFrame({"city": [f"c{i % 80}" for i in range(8000)]})
    c = bl.compute(X)["features"]["city"]
    assert len(c["proportions"]) == bl.TOP and c["other"] == pytest.approx(30 / 80)


def test_deterministic_and_json_safe():
    X = frame(20000)
    X["allnan"] = np.nan
    X["inf"] = np.where(np.arange(len(X)) % 2 == 0, np.inf, 1.0)
    one, two = bl.to_bytes(bl.compute(X, X["x"].to_numpy(), "regression")), bl.to_bytes(bl.compute(X, X["x"].to_numpy(), "regression"))
    assert one == two
    doc = json.loads(one)  # strict JSON: to_bytes refuses NaN and infinity
    assert doc["features"]["allnan"]["missing"] == 1.0 and doc["features"]["allnan"]["mean"] is None
    assert doc["prediction"]["kind"] == "numeric"
    assert bl.from_bytes(one) == doc


def test_psi_and_tests_tell_drift_from_noise():
    from mlpipe.monitor import feature_drift
    base = bl.compute(frame(20000, seed=1))["features"]
    same, moved = frame(3000, seed=2), frame(3000, seed=3, shift=1.0)
    assert feature_drift(base["x"], same["x"])["psi"] < 0.05
    d = feature_drift(base["x"], moved["x"])
    assert d["psi"] > 0.25 and d["test"] == "ks_2samp" and d["p_value"] < 1e-6
    assert feature_drift(base["x"], same["x"])["p_value"] > 1e-3
    colours = pd.Series(["blue"] * 2000 + ["purple"] * 1000)  # a category never seen at training: OTHER
    d = feature_drift(base["colour"], colours)
    assert d["test"] == "chisquare" and d["psi"] > 1 and d["p_value"] < 1e-6
    assert feature_drift(base["colour"], same["colour"])["psi"] < 0.05
    assert bl.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    # a live value beyond the training range still lands in the open outer bins
    b, live = bl.live_proportions(base["x"], [100.0, -100.0, None])
    assert live[0] == pytest.approx(1 / 3) and live[-2] == pytest.approx(1 / 3) and live[-1] == pytest.approx(1 / 3)


def test_train_stores_the_baseline_as_a_verified_file(tmp_path):
    from mlpipe import spec, train
    s = spec.load(EXAMPLES / "hello-world.yml")
    m = train.train(s, tmp_path / "v", onnx=False)
    assert m["baseline"] == {"file": "baseline.json", "rows": m["data"]["train_rows"], "schema": bl.SCHEMA}
    assert "baseline.json" in m["files"]
    artifact.verify_dir(tmp_path / "v", m)
    doc = bl.from_bytes((tmp_path / "v" / "baseline.json").read_bytes())
    inputs = [i["name"] for i in m["signature"]["inputs"]]
    assert sorted(doc["features"]) == sorted(inputs) and doc["rows"] == m["data"]["train_rows"]
    assert doc["prediction"]["kind"] == "categorical"
    assert doc["prediction"]["rows"] == m["data"]["test_rows"]
