"""The linear fast path (mlpipe.linear): what training exports, what the scorer declines, and that a
server with it answers every request exactly as the general path (ONNX Runtime, numpy checks) does."""
import json
import math

import numpy as np
import pytest

from mlpipe import linear
from mlpipe.serve import create_app
from conftest import run_cli, small_spec, train_into


def _fit(est, X, y):
    import pandas as pd
    X = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    est.fit(X, y)
    sig = {"inputs": [{"name": c, "datatype": "FP64"} for c in X.columns],
           "target": {"classes": [c.item() for c in est.classes_]} if hasattr(est, "classes_") else {},
           "allow_nan": False}
    return linear.export(est, X, est.predict(X), sig), X


@pytest.mark.parametrize("make", [
    lambda: __import__("sklearn.linear_model", fromlist=["x"]).LogisticRegression(max_iter=5000),
    lambda: __import__("sklearn.pipeline", fromlist=["x"]).make_pipeline(
        __import__("sklearn.preprocessing", fromlist=["x"]).StandardScaler(),
        __import__("sklearn.preprocessing", fromlist=["x"]).StandardScaler(with_mean=False),
        __import__("sklearn.linear_model", fromlist=["x"]).LogisticRegression(max_iter=5000)),
    lambda: __import__("sklearn.svm", fromlist=["x"]).LinearSVC(max_iter=20000),
    lambda: __import__("sklearn.linear_model", fromlist=["x"]).RidgeClassifier(),
])
@pytest.mark.parametrize("dataset", ["breast_cancer", "iris", "wine"])
def test_classifiers_export_and_reproduce_sklearn(make, dataset):
    from sklearn import datasets
    X, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    data, Xf = _fit(make(), X, y)
    assert data is not None
    scorer = linear.LinearScorer.from_json(data)
    assert len(scorer.coef) == (1 if dataset == "breast_cancer" else len(set(y)))


@pytest.mark.parametrize("make, exported", [
    ("sklearn.linear_model.LinearRegression", True),
    ("sklearn.linear_model.Ridge", True),
    ("sklearn.linear_model.Lasso", True),
    ("sklearn.linear_model.PoissonRegressor", False),     # exp(x . w + b): not linear, refused by the proof
    ("sklearn.ensemble.RandomForestRegressor", False),
    ("sklearn.neighbors.KNeighborsRegressor", False),
])
def test_regressors_export_only_when_linear(make, exported):
    from sklearn.datasets import load_diabetes
    from mlpipe.spec import import_object
    X, y = load_diabetes(return_X_y=True)
    data, Xf = _fit(import_object(make)(), X, y - y.min() + 1)
    assert (data is not None) is exported
    if exported:
        est_pred = import_object(make)().fit(Xf, y - y.min() + 1).predict(Xf[:8])
        got = linear.LinearScorer.from_json(data).labels(Xf[:8].to_numpy().tolist())
        assert np.allclose(got, est_pred, rtol=1e-9)


def test_float_and_bool_labels_are_not_exported():
    """ONNX Runtime answers them as integers; the scorer would answer 1.0 or true: not the same JSON."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    X, y = load_breast_cancer(return_X_y=True)
    assert _fit(LogisticRegression(max_iter=5000), X, y.astype(float))[0] is None
    assert _fit(LogisticRegression(max_iter=5000), X, y.astype(bool))[0] is None
    assert _fit(LogisticRegression(max_iter=5000), X, np.where(y == 1, "yes", "no"))[0] is not None


def test_scaling_is_applied_as_scikit_learn_does_even_with_a_large_mean():
    """Rows a hair from the decision boundary, features with a mean of 1.7e9 and a scale of 1: folding
    the scaler into the weights would lose the digits that decide them; scaling first does not."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(3)
    X = rng.normal(0, 1, size=(400, 3)) + np.array([1.7e9, -2.3e8, 5.0])
    y = (X[:, 0] - 1.7e9 + 0.5 * (X[:, 1] + 2.3e8) > 0).astype(int)
    est = make_pipeline(StandardScaler(), LogisticRegression())
    data, Xf = _fit(est, X, y)
    assert data is not None
    scorer = linear.LinearScorer.from_json(data)
    # rows whose score is about +-1e-9: move along the first feature until the decision function crosses 0
    lr, sc = est[-1], est[0]
    base = Xf.iloc[:200].to_numpy()
    step = 1e-9 / lr.coef_[0, 0] * sc.scale_[0]
    near = base.copy()
    near[:, 0] = base[:, 0] - lr.decision_function(sc.transform(base)) / lr.coef_[0, 0] * sc.scale_[0]
    rows = np.vstack([near + k * step for k in (-3, -1, 0, 1, 3)])
    import pandas as pd
    want = est.predict(pd.DataFrame(rows, columns=Xf.columns)).tolist()
    got = [label for i in range(0, len(rows), linear.MAX_ROWS) for label in scorer.labels(rows[i:i + linear.MAX_ROWS].tolist())]
    assert got == want
    assert scorer.matrix_labels(rows).tolist() == want
    assert 0 < sum(want) < len(want)  # both sides of the boundary are there


def test_other_pipelines_and_multi_target_are_not_exported():
    from sklearn.datasets import load_iris
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    X, y = load_iris(return_X_y=True)
    assert _fit(make_pipeline(PCA(2), LogisticRegression()), X, y)[0] is None
    assert _fit(LinearRegression(), X, np.c_[y, y * 2.0])[0] is None


def test_scorer_declines_what_the_general_path_must_check():
    s = linear.LinearScorer([[1.0, -2.0, 0.0]], [0.5], ["no", "yes"])
    assert s.labels([[1.0, 0.0, 3.0]]) == ["yes"]
    assert s.labels([[0.0, 1.0, 3.0], [2.0, 0.0, 0.0]]) == ["no", "yes"]
    declined = [
        [[1, 0.0, 3.0]],                  # an int: numpy's path converts it
        [[True, 0.0, 3.0]], [[None, 0.0, 3.0]], [["1.0", 0.0, 3.0]], [[[1.0], 0.0, 3.0]],
        [[1.0, 0.0, math.inf]],           # its weight is 0: inf * 0 is NaN, still caught
        [[math.nan, 0.0, 0.0]], [[1e308, -1e308, 0.0]],   # an overflow goes the general way too
        [[1.0, 0.0]], [[1.0, 0.0, 3.0, 4.0]], [(1.0, 0.0, 3.0)], [1.0, 0.0, 3.0], [],
        [[1.0, 0.0, 3.0]] * (linear.MAX_ROWS + 1), "rows", None,
    ]
    for rows in declined:
        assert s.labels(rows) is None, rows
    assert s.matrix_labels(np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 3.0]])).tolist() == ["yes", "no"]
    assert s.matrix_labels(np.array([[1e308, -1e308, 0.0]])) is None  # an overflow: the model's own run decides
    multi = linear.LinearScorer([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [0.0, 0.0, 0.0], [3, 1, 2])
    assert multi.labels([[2.0, 1.0], [0.0, 5.0]]) == [3, 1]  # a tie goes to the first class, as argmax does
    assert multi.matrix_labels(np.array([[2.0, 1.0], [0.0, 5.0]])).tolist() == [3, 1]
    reg = linear.LinearScorer([[2.0, 1.0]], [0.5], None)
    assert reg.labels([[1.0, 1.0]]) == [3.5] and reg.matrix_labels(np.array([[1.0, 1.0], [0.0, 0.0]])).tolist() == [3.5, 0.5]
    with pytest.raises(ValueError):
        linear.LinearScorer([[1.0, math.nan]], [0.0], None)
    with pytest.raises(ValueError):
        linear.LinearScorer([[1.0], [2.0]], [0.0, 0.0], ["a", "b", "c"])


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """A 1-row-fast server and the same folder served without the fast path, for three models: a
    binary LogisticRegression, a scaled multiclass pipeline (iris) and a Ridge regressor."""
    tmp = tmp_path_factory.mktemp("linear")
    reg = tmp / "reg"
    import yaml

    def write_spec(d, name):
        (tmp / name).write_text(yaml.safe_dump(d))
        return tmp / name
    specs = [small_spec("lin-bin"),
             small_spec("lin-iris", data={"source": "sklearn:iris", "target": "target"},
                        model={"steps": [{"estimator": "sklearn.preprocessing.StandardScaler"},
                                         {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 2000}}]},
                        gate={}),
             small_spec("lin-reg", data={"source": "sklearn:diabetes", "target": "target"},
                        model={"estimator": "sklearn.linear_model.Ridge", "params": {"alpha": 0.1}},
                        split={"test_size": 0.25, "random_state": 3}, metrics=["r2"], gate={})]
    out = {}
    for spec in specs:
        train_into(reg, spec, write_spec)
        d = tmp / "models" / spec["name"]
        assert run_cli("models", "pull", f"{spec['name']}:1", "--dest", d, "--registry", reg, "--activate").returncode == 0
        assert (d / "1" / linear.FILE).is_file()
        fast = create_app({"model_dir": str(d), "capture_sample": 0})
        slow = create_app({"model_dir": str(d), "capture_sample": 0})
        assert fast.extensions["mlpipe"].only().model.linear is not None
        slow.extensions["mlpipe"].only().model.linear = None
        features = fast.extensions["mlpipe"].only().model.features
        out[spec["name"]] = (fast.test_client(), slow.test_client(), features)
    return out


def _same(fast, slow, path, body):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body, allow_nan=True)
    a = fast.post(path, data=data, content_type="application/json")
    b = slow.post(path, data=data, content_type="application/json")
    assert a.status_code == b.status_code, (body, a.data[:300], b.data[:300])
    ja, jb = a.get_json(), b.get_json()
    for j in (ja, jb):
        j.pop("request_id", None)
        j.pop("id", None)
    assert _close(ja, jb), (body, ja, jb)
    assert a.headers.get("X-Model-Version") == b.headers.get("X-Model-Version")
    return a


def _close(a, b) -> bool:
    """Equal JSON, floats within 1e-6 relative (a regressor's values: Python's float64 sum against
    ONNX Runtime's own order of additions)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("name", ["lin-bin", "lin-iris", "lin-reg"])
def test_fast_path_answers_as_the_general_path(apps, name):
    """Random rows around the data's scale, in every request shape the fast path takes and some it
    declines: the same status, the same predictions (a label that differs only at a decision boundary
    of 1e-12 would not show with these values)."""
    fast, slow, features = apps[name]
    rng = np.random.default_rng(7)
    n = len(features)
    for rows in range(1, linear.MAX_ROWS + 3):
        X = rng.normal(0, 3, size=(rows, n)) * rng.choice([0.01, 1, 100], size=n)
        data = X.tolist()
        r = _same(fast, slow, "/invocations", {"dataframe_split": {"columns": features, "data": data}})
        assert r.status_code == 200 and len(r.get_json()["predictions"]) == rows
        _same(fast, slow, "/invocations", {"dataframe_split": {"data": data}})
        _same(fast, slow, "/invocations", {"instances": data})
        _same(fast, slow, "/invocations", {"dataframe_records": [dict(zip(features, row)) for row in data]})
        _same(fast, slow, "/invocations", {"dataframe_split": {"columns": features[::-1], "data": [r[::-1] for r in data]}})
        oip = {"inputs": [{"name": "input-0", "shape": [rows, n], "datatype": "FP64", "data": X.ravel().tolist()}]}
        r = _same(fast, slow, f"/v2/models/{name}/infer", oip)
        assert r.status_code == 200
        _same(fast, slow, f"/v2/models/{name}/infer", {**oip, "outputs": [{"name": "predict"}], "id": "a-1"})
        _same(fast, slow, f"/v2/models/{name}/infer", {**oip, "inputs": [{**oip["inputs"][0], "datatype": "FP32"}]})
        if name != "lin-reg":
            _same(fast, slow, f"/v2/models/{name}/infer", {**oip, "outputs": [{"name": "predict_proba"}]})


@pytest.mark.parametrize("name", ["lin-bin", "lin-reg"])
def test_fast_path_refuses_what_the_general_path_refuses(apps, name):
    fast, slow, features = apps[name]
    n = len(features)
    row = [0.5] * n
    bad_rows = [[*row[:-1], None], [*row[:-1], True], [*row[:-1], "1.5"], [*row[:-1], [1.0]], row[:-1], row + [1.0],
                [*row[:-1], 1]]
    for bad in bad_rows:
        _same(fast, slow, "/invocations", {"dataframe_split": {"columns": features, "data": [row, bad]}})
        _same(fast, slow, "/invocations", {"instances": [bad]})
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = '{"instances": [[' + ", ".join(["0.5"] * (n - 1) + [literal]) + "]]}"
        r = _same(fast, slow, "/invocations", body)
        assert r.status_code == 400 and "finite" in r.get_json()["error"]
    _same(fast, slow, "/invocations", {"instances": [[1e308] * n]})  # finite, overflowing: the general path's answer
    _same(fast, slow, "/invocations", {"dataframe_split": {"columns": features, "data": []}})
    oip = {"name": "input-0", "shape": [1, n], "datatype": "FP64", "data": row}
    for t in ({**oip, "shape": [2, n]}, {**oip, "shape": [1, n + 1]}, {**oip, "data": row[:-1] + [None]},
              {**oip, "shape": [True, n]}, {**oip, "name": features[0]}, {**oip, "parameters": {"binary_data_size": 8}}):
        _same(fast, slow, f"/v2/models/{name}/infer", {"inputs": [t]})
    _same(fast, slow, f"/v2/models/{name}/infer", {"inputs": [oip], "outputs": [{"name": "nope"}]})
    _same(fast, slow, f"/v2/models/{name}/infer", {"inputs": [oip], "outputs": "predict"})


def test_fuzzed_bodies_answer_alike(apps):
    """Hostile and odd bodies (hypothesis): the fast path never answers what the general path would not."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    fast, slow, features = apps["lin-bin"]
    n = len(features)
    value = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.none(), st.booleans(),
                      st.text(max_size=2))
    row = st.one_of(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n),
                    st.lists(value, min_size=n - 1, max_size=n + 1))
    body = st.one_of(
        st.fixed_dictionaries({"instances": st.lists(row, max_size=linear.MAX_ROWS + 1)}),
        st.fixed_dictionaries({"dataframe_split": st.fixed_dictionaries({"columns": st.just(features), "data": st.lists(row, max_size=3)})}),
        st.lists(row, min_size=1, max_size=3).map(lambda rows: {"inputs": [{
            "name": "x", "shape": [len(rows), n], "datatype": "FP64", "data": [v for r in rows for v in r]}]}),
    )

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body)
    def run(b):
        _same(fast, slow, "/v2/models/lin-bin/infer" if "inputs" in b else "/invocations", b)
    run()


def test_a_tampered_linear_file_is_not_used(tmp_path, write_spec, caplog):
    reg = tmp_path / "reg"
    train_into(reg, small_spec("lin-t"), write_spec)
    d = tmp_path / "m"
    assert run_cli("models", "pull", "lin-t:1", "--dest", d, "--registry", reg, "--activate").returncode == 0
    f = d / "1" / linear.FILE
    doc = json.loads(f.read_text())
    doc["intercept"] = [doc["intercept"][0] + 1000.0]
    f.write_text(json.dumps(doc))
    app = create_app({"model_dir": str(d), "capture_sample": 0})
    m = app.extensions["mlpipe"].only().model
    assert m is not None and m.linear is None  # served, through ONNX Runtime
    assert "not using linear.json" in caplog.text and "sha256 mismatch" in caplog.text
    r = app.test_client().post("/invocations", json={"instances": [[0.5] * len(m.features)]})
    assert r.status_code == 200


def test_fast_path_answers_are_captured_like_any_other(apps, tmp_path):
    """The rows the linear scorer answered reach the capture database as a matrix, like the general path's."""
    from mlpipe import capture
    from mlpipe.serve import metrics
    fast_client, _, features = apps["lin-bin"]
    d = fast_client.application.extensions["mlpipe"].only().model_dir
    app = create_app({"model_dir": str(d), "capture_db": f"sqlite:///{tmp_path}/capture.db", "capture_sample": 1,
                      "host": "h"})
    assert app.extensions["mlpipe"].only().model.linear is not None
    c = app.test_client()
    rows = [[0.25 * (i + 1)] * len(features) for i in range(3)]
    r = c.post("/invocations", json={"instances": rows})
    oip = c.post("/v2/models/lin-bin/infer", json={"inputs": [{"name": "x", "shape": [1, len(features)], "datatype": "FP64",
                                                                "data": rows[0]}]})
    assert r.status_code == oip.status_code == 200
    metrics().capture_source.flush()
    got = capture.Store(f"sqlite:///{tmp_path}/capture.db").predictions("lin-bin")
    mine = got[got.request_id == r.json["request_id"]].sort_values("row")
    assert mine.prediction.tolist() == r.json["predictions"]
    assert np.allclose([[row[f] for f in features] for _, row in mine.iterrows()], rows)
    assert got[got.request_id == oip.json["request_id"]].prediction.tolist() == oip.json["outputs"][0]["data"]
