import json

import numpy as np
import pytest

from mlpipe import artifact, onnx, spec, train
from mlpipe.errors import DataError
from conftest import EXAMPLES, small_spec


def test_train_writes_complete_manifest(tmp_path):
    s = spec.load(EXAMPLES / "credit-risk.yml")
    m = train.train(s, tmp_path / "a", message="hello")
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk == m
    for key in ("id", "name", "created", "message", "estimator", "params", "metrics", "data", "signature",
                "library_versions", "files"):
        assert key in m, key
    assert m["name"] == "credit-risk" and m["message"] == "hello" and len(m["id"]) == 8
    assert m["params"] == {"max_depth": 4, "random_state": 12345, "criterion": "gini"}
    assert set(m["metrics"]) == {"accuracy", "f1_macro"}
    assert m["data"]["rows"] == 569 and len(m["data"]["fingerprint"]) == 64
    assert m["signature"]["target"] == {"name": "target", "dtype": "int64", "kind": "classification", "classes": [0, 1]}
    assert m["signature"]["inputs"][0] == {"name": "mean radius", "dtype": "float64", "datatype": "FP64"}
    assert len(m["signature"]["inputs"]) == 30
    assert set(m["library_versions"]) >= {"python", "scikit-learn", "numpy", "joblib"}
    assert m["files"]["model.joblib"]["sha256"] == artifact.sha256_file(tmp_path / "a" / "model.joblib")
    assert m["created"].endswith("Z")


def test_training_is_deterministic(tmp_path):
    s = spec.load(EXAMPLES / "credit-risk.yml")
    a = train.train(s, tmp_path / "a")
    b = train.train(s, tmp_path / "b")
    assert a["metrics"] == b["metrics"]
    assert a["data"]["fingerprint"] == b["data"]["fingerprint"]


def test_regression_signature_and_metrics(tmp_path):
    s = spec.load(EXAMPLES / "house-prices.yml")
    m = train.train(s, tmp_path / "r")
    assert m["signature"]["target"]["kind"] == "regression"
    assert m["metrics"]["neg_mean_absolute_error"] < 0 < m["metrics"]["r2"]


@pytest.mark.parametrize("estimator,classifier", [
    ("sklearn.ensemble.RandomForestClassifier", True),
    ("sklearn.linear_model.LogisticRegression", True),
    ("sklearn.tree.DecisionTreeClassifier", True),
])
def test_onnx_agrees_with_sklearn(tmp_path, estimator, classifier, write_spec):
    params = {"max_iter": 3000} if "Logistic" in estimator else {"random_state": 0}
    s = spec.load(write_spec(small_spec(model={"estimator": estimator, "params": params})))
    m = train.train(s, tmp_path / "o")
    assert m["onnx"]["status"] == "ok", m["onnx"]
    assert "model.onnx" in m["files"]
    # the accepted ONNX graph gives the same labels as scikit-learn on the whole data set
    model, _ = artifact.load_model(tmp_path / "o")
    X = train.load_xy(s)[1]
    sess = onnx.session((tmp_path / "o" / "model.onnx").read_bytes())
    got = onnx.run(sess, X.to_numpy(dtype=np.float64))[0]
    assert np.array_equal(got, model.predict(X))


def test_onnx_skipped_for_text_features(tmp_path, write_spec):
    import pandas as pd
    df = pd.DataFrame({"color": ["red", "blue"] * 50, "size": range(100), "y": [0, 1] * 50})
    df.to_csv(tmp_path / "c.csv", index=False)
    s = spec.load(write_spec(small_spec(
        data={"source": f"csv:{tmp_path / 'c.csv'}", "target": "y"},
        model={"steps": [{"estimator": "sklearn.preprocessing.OneHotEncoder", "params": {"handle_unknown": "ignore"}},
                         {"estimator": "sklearn.linear_model.LogisticRegression"}]})))
    m = train.train(s, tmp_path / "t")
    assert m["onnx"]["status"] == "skipped"
    assert "model.onnx" not in m["files"]
    assert m["signature"]["inputs"][0]["datatype"] == "BYTES"


def test_non_numeric_without_encoder_is_a_clear_error(tmp_path, write_spec):
    import pandas as pd
    pd.DataFrame({"color": ["red", "blue"] * 50, "y": [0, 1] * 50}).to_csv(tmp_path / "c.csv", index=False)
    s = spec.load(write_spec(small_spec(data={"source": f"csv:{tmp_path / 'c.csv'}", "target": "y"})))
    with pytest.raises(DataError, match="could not fit.*encoder"):
        train.train(s, tmp_path / "t")


def test_onnx_rejected_when_it_disagrees():
    """A compiled graph that disagrees with scikit-learn is refused: here the estimator's own
    predict flips the labels, while skl2onnx compiles the plain logistic regression underneath."""
    from skl2onnx import update_registered_converter
    from skl2onnx.operator_converters.linear_classifier import convert_sklearn_linear_classifier
    from skl2onnx.shape_calculators.linear_classifier import calculate_linear_classifier_output_shapes
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    class FlippedLR(LogisticRegression):
        def predict(self, X):
            return 1 - super().predict(X)

    update_registered_converter(FlippedLR, "MlpipeTestFlippedLR", calculate_linear_classifier_output_shapes,
                                convert_sklearn_linear_classifier, options={"zipmap": [True, False, "columns"], "nocl": [True, False],
                                         "raw_scores": [True, False], "output_class_labels": [False, True]})
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    est = FlippedLR(max_iter=5000).fit(X, y)
    data, info = onnx.convert_and_check(est, X, X, classifier=True)
    assert data is None and info["status"] == "rejected" and "disagree" in info["reason"]
    plain = LogisticRegression(max_iter=5000).fit(X, y)
    data, info = onnx.convert_and_check(plain, X, X, classifier=True)
    assert data is not None and info["status"] == "ok" and info["precision"] == "float64"


def _forest(case):
    from sklearn.datasets import make_classification, make_regression
    from sklearn.ensemble import ExtraTreesClassifier, ExtraTreesRegressor, RandomForestClassifier, RandomForestRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y = make_classification(n_samples=400, n_features=6, n_informative=4, n_classes=3, random_state=0)
    Xr, yr = make_regression(n_samples=400, n_features=6, random_state=0)
    return {
        "rf-binary": (RandomForestClassifier(8, random_state=0), X, y % 2, True),
        "rf-multiclass-balanced": (RandomForestClassifier(8, max_depth=5, class_weight="balanced", random_state=0), X, y, True),
        "et-string-labels": (ExtraTreesClassifier(8, random_state=0), X, np.array(["a", "b", "c"])[y], True),
        "rf-regressor": (RandomForestRegressor(8, random_state=0), Xr, yr, False),
        "et-regressor": (ExtraTreesRegressor(8, max_depth=6, random_state=0), Xr, yr, False),
        "pipeline": (make_pipeline(StandardScaler(), RandomForestClassifier(8, random_state=0)), X, y, True),
        "pipeline-regressor": (make_pipeline(StandardScaler(), ExtraTreesRegressor(8, random_state=0)), Xr, yr, False),
        "features-far-from-zero": (RandomForestClassifier(8, random_state=0), X * 1e6 + 3e7, y, True),
    }[case]


@pytest.mark.parametrize("case", ["rf-binary", "rf-multiclass-balanced", "et-string-labels", "rf-regressor",
                                  "et-regressor", "pipeline", "pipeline-regressor", "features-far-from-zero"])
def test_forest_onnx_is_what_skl2onnx_writes_byte_for_byte(case):
    """A forest's TreeEnsemble node is built with numpy (skl2onnx writes it one tree node at a time in
    Python, ~2.5 s for 150 trees); the model is exactly the one skl2onnx writes."""
    from skl2onnx import to_onnx
    est, X, y, classifier = _forest(case)
    est.fit(X, y)
    x1 = X[:1].astype(np.float32)
    options = {id(est): {"zipmap": False}} if classifier else None
    fast = onnx._forest_to_onnx(est, x1, options)
    assert fast is not None
    assert fast == to_onnx(est, x1, options=options).SerializeToString()


def test_forest_onnx_fallback_through_protobuf_writes_the_same_bytes(monkeypatch):
    """When the byte splice cannot place its lists (it returns None), protobuf merges them: same model."""
    from skl2onnx import to_onnx
    monkeypatch.setattr(onnx, "_splice", lambda *a, **k: None)
    for case in ("rf-binary", "et-regressor"):
        est, X, y, classifier = _forest(case)
        est.fit(X, y)
        x1 = X[:1].astype(np.float32)
        options = {id(est): {"zipmap": False}} if classifier else None
        assert onnx._forest_to_onnx(est, x1, options) == to_onnx(est, x1, options=options).SerializeToString()


def test_varints_are_protobufs_own_encoding():
    """The int lists go into the ONNX model as packed varints built with numpy; protobuf's own
    encoder is the reference (negative values take ten bytes, wide values several)."""
    from onnx import AttributeProto
    rng = np.random.default_rng(0)
    for values in ([], [0, 5, 127], [128, 300, 2**21, 2**35, 2**63 - 1], [-1, -5, 0, 1],
                   rng.integers(-2**40, 2**40, 5000).tolist()):
        want = AttributeProto(name="x", type=AttributeProto.INTS, ints=values).SerializeToString()
        data = onnx._varints(np.array(values, dtype=np.int64))
        got = AttributeProto(name="x", type=AttributeProto.INTS)
        got.MergeFromString(b"\x42" + onnx._varint(len(data)) + data)
        assert got.SerializeToString() == want
        # unpacked (a tag before each), as onnx's proto2 lists are written
        head = AttributeProto(name="x", type=AttributeProto.INTS).SerializeToString()
        assert want == head[:3] + onnx._unpacked(AttributeProto.INTS, np.array(values, dtype=np.int64)) + head[3:]


def test_forest_numpy_attributes_round_thresholds_like_skl2onnx():
    """Both of skl2onnx's float32 threshold cases occur (a threshold float32 holds exactly, and one it
    rounds up, which takes the next float32 below): the byte comparison above covers both."""
    from skl2onnx.common.tree_ensemble import sklearn_threshold
    est, X, y, _ = _forest("rf-binary")
    tree = est.fit(X, y).estimators_[0].tree_
    inner = tree.children_left > np.arange(tree.node_count)
    t = tree.threshold[inner]
    assert (t.astype(np.float32) == t).any() and (t.astype(np.float32) > t).any()
    ours = onnx.forest_attributes([tree], classifier=True)["nodes_values"][inner]
    assert ours.tolist() == [np.float32(sklearn_threshold(v, np.float32, "BRANCH_LEQ")) for v in t]


def test_regressor_and_pipeline_forests_get_an_onnx_file(tmp_path, write_spec):
    m = train.train(spec.load(EXAMPLES / "house-prices.yml"), tmp_path / "r")  # RandomForestRegressor
    assert m["onnx"]["status"] == "ok" and m["onnx"]["precision"] == "float32", m["onnx"]
    assert "model.onnx" in m["files"] and artifact.verify_dir(tmp_path / "r")
    s = spec.load(write_spec(small_spec(model={"steps": [
        {"estimator": "sklearn.preprocessing.StandardScaler"},
        {"estimator": "sklearn.ensemble.ExtraTreesClassifier", "params": {"n_estimators": 25, "random_state": 0}}]})))
    m = train.train(s, tmp_path / "p")
    assert m["onnx"]["status"] == "ok" and m["onnx"]["rows"] == m["data"]["test_rows"], m["onnx"]
    assert json.loads((tmp_path / "p" / "manifest.json").read_text()) == m


def test_scorers_and_the_onnx_check_share_one_predict(tmp_path, monkeypatch):
    """accuracy, f1_macro and the ONNX parity check all use one predict of the test split, and the
    metrics are exactly what scikit-learn's scorers give on the fitted estimator."""
    from sklearn.tree import DecisionTreeClassifier
    calls = []
    predict = DecisionTreeClassifier.predict

    def counted(self, X, *args, **kwargs):
        calls.append(len(X))
        return predict(self, X, *args, **kwargs)
    counted.__name__ = "predict"  # scikit-learn's scorers look the response method up by name
    monkeypatch.setattr(DecisionTreeClassifier, "predict", counted)
    s = spec.load(EXAMPLES / "credit-risk.yml")
    m = train.train(s, tmp_path / "a")
    assert m["onnx"]["status"] == "ok" and calls == [m["data"]["test_rows"]]
    _, X, y = train.load_xy(s)
    _, X_test, _, y_test = train.split(s, X, y, True)
    model, _ = artifact.load_model(tmp_path / "a")
    assert m["metrics"] == train.score(model, s.metrics, X_test, y_test)


# ------------------------------------------------------------------ the holdout travels with the version
def _stored(path):
    import pandas as pd
    return pd.read_parquet(path / train.HOLDOUT_FILE)


def test_version_stores_its_test_split_as_holdout(tmp_path):
    s = spec.load(EXAMPLES / "credit-risk.yml")
    m = train.train(s, tmp_path / "a")
    f = tmp_path / "a" / "holdout.parquet"
    assert m["files"]["holdout.parquet"]["sha256"] == artifact.sha256_file(f)
    assert m["files"]["holdout.parquet"]["size"] == f.stat().st_size
    assert m["data"]["holdout"]["file"] == "holdout.parquet" and m["data"]["holdout"]["source"] == "test split"
    assert m["data"]["holdout"]["rows"] == m["data"]["test_rows"] == 114
    assert "sampled_from_rows" not in m["data"]["holdout"]
    # exactly the rows the version was scored on: features (signature order) + target
    _, X, y = train.load_xy(s)
    _, X_test, _, y_test = train.split(s, X, y, classifier=True)
    stored = _stored(tmp_path / "a")
    assert list(stored.columns) == [i["name"] for i in m["signature"]["inputs"]] + ["target"]
    assert stored.drop(columns="target").equals(X_test.reset_index(drop=True))
    assert stored["target"].equals(y_test.reset_index(drop=True))
    model, _ = artifact.load_model(tmp_path / "a")
    assert train.score(model, s.metrics, stored.drop(columns="target"), stored["target"]) == m["metrics"]
    assert m["split"] == {"test_size": 0.2, "random_state": 12345, "shuffle": True, "stratify": True}


def test_spec_holdout_is_stored_cut_to_features_and_target(tmp_path, write_spec):
    import pandas as pd
    frame = pd.DataFrame({"a": range(200), "b": [i % 7 for i in range(200)], "y": [i % 2 for i in range(200)]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    hold = frame.sample(30, random_state=1).assign(extra="not a feature")[["extra", "y", "b", "a"]]
    hold.to_csv(tmp_path / "hold.csv", index=False)
    s = spec.load(write_spec(small_spec(data={"source": "csv:train.csv", "target": "y", "holdout": "csv:hold.csv"})))
    m = train.train(s, tmp_path / "h")
    assert m["data"]["holdout"]["source"] == f"csv:{(tmp_path / 'hold.csv').resolve()}"
    assert m["data"]["holdout"]["rows"] == 30
    stored = _stored(tmp_path / "h")
    assert list(stored.columns) == ["a", "b", "y"]
    assert stored.equals(hold[["a", "b", "y"]].reset_index(drop=True))
    assert m["files"]["holdout.parquet"]["sha256"] == artifact.sha256_file(tmp_path / "h" / "holdout.parquet")


def test_spec_holdout_without_a_feature_fails_before_the_fit(tmp_path, write_spec):
    import pandas as pd
    pd.DataFrame({"a": range(100), "target": [0, 1] * 50}).to_csv(tmp_path / "hold.csv", index=False)
    s = spec.load(write_spec(small_spec(data={"source": "sklearn:breast_cancer", "target": "target",
                                              "holdout": f"csv:{tmp_path / 'hold.csv'}"})))
    with pytest.raises(DataError, match="feature column.*mean radius.*not in csv:"):
        train.train(s, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_large_evaluation_data_is_sampled_deterministically(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "HOLDOUT_MAX_ROWS", 40)
    s = spec.load(EXAMPLES / "credit-risk.yml")
    a = train.train(s, tmp_path / "a")
    b = train.train(s, tmp_path / "b")
    h = a["data"]["holdout"]
    assert h["rows"] == 40 and h["sampled_from_rows"] == 114 and "random_state" in h["sample"]
    assert len(_stored(tmp_path / "a")) == 40
    assert a["files"]["holdout.parquet"]["sha256"] == b["files"]["holdout.parquet"]["sha256"]
    # a sample of the test split: every stored row is one of its rows
    _, X, y = train.load_xy(s)
    _, X_test, _, _ = train.split(s, X, y, classifier=True)
    keys = set(map(tuple, X_test.to_numpy().round(10)))
    assert all(tuple(r) in keys for r in _stored(tmp_path / "a").drop(columns="target").to_numpy().round(10))


def test_models_show_lists_pipeline_steps(tmp_path):
    from conftest import run_cli
    reg = tmp_path / "reg"
    assert run_cli("train", EXAMPLES / "hello-world.yml", "--registry", reg).returncode == 0
    r = run_cli("models", "show", "hello-world", "--registry", reg)
    assert r.returncode == 0, r.stderr
    assert ("Steps: 1. sklearn.preprocessing.StandardScaler ()  "
            "2. sklearn.linear_model.LogisticRegression (C=1.0; max_iter=500)") in r.stdout.splitlines()
    assert "Holdout: holdout.parquet (38 rows, from test split)" in r.stdout
    assert "Content-Encoding: joblib, onnx" in r.stdout  # the holdout is data, not a model encoding
    j = json.loads(run_cli("models", "show", "hello-world", "--json", "--registry", reg).stdout)
    assert j["steps"] == [{"estimator": "sklearn.preprocessing.StandardScaler", "params": {}},
                          {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"C": 1.0, "max_iter": 500}}]


def test_onnx_thread_puts_the_switch_interval_back_even_if_result_is_never_asked(tmp_path):
    """train() may raise between start() and result() (a metric that does not fit, a full disk):
    the process-wide switch interval the conversion lowered must come back anyway."""
    import sys
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier
    before = sys.getswitchinterval()
    X = pd.DataFrame(np.random.default_rng(0).normal(size=(200, 4)), columns=list("abcd"))
    y = (X["a"] > 0).astype(int)
    est = RandomForestClassifier(5, random_state=0).fit(X, y)
    conv = onnx.Conversion(est, X, X, True).start()
    assert conv._thread is not None
    conv._thread.join(60)  # the caller walks away without result()
    assert sys.getswitchinterval() == before
