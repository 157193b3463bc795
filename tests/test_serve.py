"""The generated REST API, in process (Flask test client) and under gunicorn."""
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mlpipe import hostdir
from mlpipe.registry import Registry
from mlpipe.serve import create_app
from conftest import EXAMPLES, Server, run_cli, small_spec, train_into

FEATURES = None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A registry with credit-risk v1 (tree), v2 (logistic regression), v3 (no ONNX) and a model dir."""
    import yaml
    tmp = tmp_path_factory.mktemp("serve")
    reg = tmp / "reg"

    def write_spec(d, name):
        p = tmp / name
        p.write_text(yaml.safe_dump(d))
        return p
    base = yaml.safe_load((EXAMPLES / "credit-risk.yml").read_text())
    train_into(reg, base, write_spec, "tree")
    lr = dict(base, model={"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 5000}})
    train_into(reg, lr, write_spec, "logistic")
    train_into(reg, base, write_spec, "no onnx", ["--no-onnx"])
    model_dir = tmp / "models" / "credit-risk"
    for v in (1, 2, 3):
        assert run_cli("models", "pull", f"credit-risk:{v}", "--dest", model_dir, "--registry", reg).returncode == 0
    hostdir.activate(model_dir, 1)
    return {"reg": reg, "dir": model_dir, "tmp": tmp}


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_breast_cancer
    frame = load_breast_cancer(as_frame=True).frame
    cols = [c for c in frame.columns if c != "target"]
    return frame, cols


@pytest.fixture
def client(fleet):
    return create_app({"model_dir": str(fleet["dir"])}).test_client()


def _expected(fleet, version, X):
    from mlpipe import artifact
    model, _ = artifact.load_model(fleet["dir"] / str(version))
    return model.predict(X).tolist()


def test_mlflow_formats_agree(client, fleet, data):
    frame, cols = data
    X = frame[cols].iloc[:5]
    want = _expected(fleet, 1, X)
    rows = X.values.tolist()
    bodies = [
        {"dataframe_split": {"columns": cols, "data": rows}},
        {"dataframe_split": {"columns": cols[::-1], "data": [r[::-1] for r in rows]}},  # any column order
        {"dataframe_records": X.to_dict(orient="records")},
        {"instances": rows},
        {"instances": X.to_dict(orient="records")},
        {"inputs": X.to_dict(orient="list")},
        {"inputs": rows},
    ]
    for body in bodies:
        r = client.post("/invocations", json=body)
        assert r.status_code == 200, (body.keys(), r.json)
        assert r.json["predictions"] == want and r.headers["X-Model-Version"] == "1"
    r = client.post("/invocations", data=X.to_csv(index=False), content_type="text/csv")
    assert r.status_code == 200 and r.json["predictions"] == want


def test_pandas_split_orient_from_an_mlflow_client(client, data):
    """What mlflow's own client sends: pandas' to_json(orient='split') wrapped in dataframe_split."""
    frame, cols = data
    payload = '{"dataframe_split": ' + frame[cols].head(3).to_json(orient="split") + "}"
    r = client.post("/invocations", data=payload, content_type="application/json; format=pandas-split")
    assert r.status_code == 200 and len(r.json["predictions"]) == 3


def test_oip_infer_per_feature_and_2d(client, fleet, data):
    frame, cols = data
    X = frame[cols].iloc[:4]
    want = _expected(fleet, 1, X)
    inputs = [{"name": c, "shape": [4], "datatype": "FP64", "data": X[c].tolist()} for c in cols]
    r = client.post("/v2/models/credit-risk/infer", json={"id": "r1", "inputs": inputs,
                                                           "outputs": [{"name": "predict"}, {"name": "predict_proba"}]})
    assert r.status_code == 200, r.json
    assert r.json["id"] == "r1" and r.json["model_version"] == "1"
    out = {o["name"]: o for o in r.json["outputs"]}
    assert out["predict"]["data"] == want and out["predict_proba"]["shape"] == [4, 2]
    r = client.post("/v2/models/credit-risk/versions/1/infer",
                    json={"inputs": [{"name": "x", "shape": [4, 30], "datatype": "FP32", "data": X.values.ravel().tolist()}]})
    assert r.status_code == 200 and r.json["outputs"][0]["data"] == want
    assert [o["name"] for o in r.json["outputs"]] == ["predict"]


def test_metadata_endpoints(client):
    meta = client.get("/v2/models/credit-risk").json
    assert meta["versions"] == ["1"] and len(meta["inputs"]) == 30 and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "mean radius", "datatype": "FP64", "shape": [-1]}
    assert client.get("/v2/models/credit-risk/versions/1/ready").json["ready"] is True
    assert client.get("/v2/models/credit-risk/versions/9/ready").status_code == 404
    assert client.get("/v2/models/other").status_code == 404
    assert client.get("/v2").json["name"] == "mlpipe"
    m = client.get("/metadata").json
    assert m["version"] == 1 and m["runtime"] == "onnxruntime" and "metrics" in m and "created" in m and "id" in m
    doc = client.get("/openapi.json").json
    assert doc["openapi"].startswith("3.") and "/invocations" in doc["paths"]
    assert "mean radius" in doc["components"]["schemas"]["Record"]["properties"]
    assert client.get("/ping").status_code == 200 and client.get("/version").status_code == 200


BAD = [
    ({"dataframe_split": {"columns": ["nope"], "data": [[1]]}}, 400, "unknown feature 'nope'"),
    ({"dataframe_split": {"columns": ["mean radius"], "data": [[1]]}}, 400, "missing feature 'mean texture' (and 28 more)"),
    ({"dataframe_records": [{"mean radius": 1}]}, 400, "missing feature 'mean texture' in record 0"),
    ({"instances": [[1, 2]]}, 400, "row 0 has 2 values, expected 30"),
    ({"instances": []}, 400, "no rows"),
    ({"dataframe_split": {"data": [["a"] * 30]}}, 400, "feature 'mean radius' in row 0 is \"a\", expected a number"),
    ({"dataframe_split": {"data": [[True] * 30]}}, 400, "expected a number"),
    ({"dataframe_split": {"data": [[None] * 30]}}, 400, "is null (NaN); this model cannot take missing values"),
    ({"dataframe_split": {"data": [[float("nan")] * 30]}}, 400, "NaN/null or infinite"),
    ({"instances": [[1] * 30], "inputs": [[1] * 30]}, 400, "exactly one of"),
    ({"rows": []}, 400, "exactly one of"),
    ([1, 2], 400, "must be an object"),
]


@pytest.mark.parametrize("body,status,message", BAD)
def test_validation_errors_name_the_field(client, body, status, message):
    r = client.post("/invocations", json=body)
    assert r.status_code == status and message in r.json["error"], r.json


def test_transport_errors(client, fleet):
    r = client.post("/invocations", data="{not json", content_type="application/json")
    assert r.status_code == 400 and "not valid JSON" in r.json["error"]
    r = client.post("/invocations", data="a=b", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415
    r = client.get("/nope")
    assert r.status_code == 404 and "openapi.json" in r.json["error"]
    small = create_app({"model_dir": str(fleet["dir"]), "max_body_bytes": 1000, "max_rows": 2}).test_client()
    r = small.post("/invocations", data=b"x" * 2000, content_type="application/json")
    assert r.status_code == 413 and "larger than 1000 bytes" in r.json["error"]
    r = small.post("/invocations", json={"instances": [[1] * 30] * 3})
    assert r.status_code == 413 and "3 rows" in r.json["error"]
    r = client.post("/v2/models/credit-risk/infer", json={"inputs": [{"name": "mean radius", "shape": [1], "datatype": "FP64", "data": ["x"]}]})
    assert r.status_code == 400 and "mean radius" in r.json["error"]
    r = client.post("/v2/models/credit-risk/infer", json={"inputs": [{"name": "x", "shape": [1, 29], "datatype": "FP64", "data": [1] * 29}]})
    assert r.status_code == 400 and "[rows, 30]" in r.json["error"]
    r = client.post("/v2/models/credit-risk/infer", json={"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP99", "data": [1] * 30}]})
    assert r.status_code == 400 and "unknown datatype" in r.json["error"]
    r = client.post("/v2/models/credit-risk/infer", json={"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP64", "data": [1] * 30}],
                                                         "outputs": [{"name": "logits"}]})
    assert r.status_code == 400 and "unknown output 'logits'" in r.json["error"]


def test_auth(fleet, caplog):
    c = create_app({"model_dir": str(fleet["dir"]), "auth_tokens": ["s3cret-token", "other"]}).test_client()
    body = {"instances": [[1.0] * 30]}
    with caplog.at_level("DEBUG"):
        assert c.post("/invocations", json=body).status_code == 401
        r = c.post("/invocations", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert c.post("/invocations", json=body, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert c.post("/invocations", json=body, headers={"Authorization": "Bearer other"}).status_code == 200
    for open_path in ("/v2/health/live", "/v2/health/ready", "/ping", "/metrics", "/v2/models/credit-risk/ready"):
        assert c.get(open_path).status_code == 200, open_path
    for closed in ("/metadata", "/v2/models/credit-risk", "/openapi.json", "/v2", "/version"):
        assert c.get(closed).status_code == 401, closed
    assert "s3cret" not in caplog.text


def test_bearer_scheme_is_case_insensitive(fleet):
    """RFC 7235: the auth scheme is case-insensitive; the token itself is not."""
    c = create_app({"model_dir": str(fleet["dir"]), "auth_tokens": ["s3cret-token"]}).test_client()
    body = {"instances": [[1.0] * 30]}
    for header in ("Bearer s3cret-token", "bearer s3cret-token", "BEARER s3cret-token", "bEaReR  s3cret-token"):
        assert c.post("/invocations", json=body, headers={"Authorization": header}).status_code == 200, header
        assert c.get("/metadata", headers={"Authorization": header}).status_code == 200, header
    for header in ("Bearer S3CRET-TOKEN", "Basic s3cret-token", "Bearers3cret-token", "s3cret-token", "Bearer",
                   "Bearer s3cret-token extra"):
        assert c.post("/invocations", json=body, headers={"Authorization": header}).status_code == 401, header


def test_an_empty_auth_token_is_refused(fleet):
    """An empty token in the list would let every request without a token in."""
    from mlpipe.errors import UsageError
    with pytest.raises(UsageError, match="empty"):
        create_app({"model_dir": str(fleet["dir"]), "auth_tokens": ["s3cret-token", ""]})


def test_metrics_count_requests_and_predictions(client, data):
    frame, cols = data
    client.post("/invocations", json={"instances": frame[cols].head(10).values.tolist()})
    text = client.get("/metrics").data.decode()
    assert 'mlpipe_requests_total{endpoint="/invocations",model="credit-risk",status="200"}' in text
    assert "mlpipe_request_seconds_bucket" in text
    assert 'mlpipe_model_info{id="' in text and 'runtime="onnxruntime",version="1"} 1.0' in text
    assert 'mlpipe_predictions_total{label="0",model="credit-risk",version="1"}' in text


def test_require_onnx_refuses_pickle_only_version(fleet, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fleet["dir"], d, symlinks=True)
    hostdir.activate(d, 3)
    (d / ".last-good").unlink(missing_ok=True)
    os.unlink(d / "previous")
    app = create_app({"model_dir": str(d), "require_onnx": True})
    c = app.test_client()
    assert c.get("/v2/health/ready").status_code == 503
    assert "refuses to unpickle" in c.get("/v2/health/ready").json["error"]
    assert c.post("/invocations", json={"instances": [[1.0] * 30]}).status_code == 503
    ok = create_app({"model_dir": str(d)}).test_client()
    assert ok.get("/metadata").json["runtime"] == "sklearn"
    # scikit-learn's trees take missing values: on the sklearn runtime a null is a NaN, not an error
    row = [1.0] * 29 + [None]
    r = ok.post("/invocations", json={"instances": [row]})
    assert r.status_code == 200 and len(r.json["predictions"]) == 1
    r = ok.post("/invocations", json={"instances": [[1.0] * 29 + ["x"]]})
    assert r.status_code == 400 and "expected a number" in r.json["error"]


def test_require_onnx_never_unpickles(fleet, tmp_path, monkeypatch):
    """A version without model.onnx is refused under require_onnx before joblib.load is reached."""
    import joblib
    from mlpipe.errors import IntegrityError
    from mlpipe.serve import LoadedModel
    calls = []

    def spy(*a, **k):
        calls.append(a)
        raise AssertionError("joblib.load called")
    monkeypatch.setattr(joblib, "load", spy)
    assert "model.onnx" not in json.loads((fleet["dir"] / "3" / "manifest.json").read_text())["files"]
    with pytest.raises(IntegrityError, match="refuses to unpickle"):
        LoadedModel.load(fleet["dir"] / "3", require_onnx=True)
    d = tmp_path / "m"
    shutil.copytree(fleet["dir"], d, symlinks=True)
    hostdir.activate(d, 3)
    (d / ".last-good").unlink(missing_ok=True)
    os.unlink(d / "previous")
    c = create_app({"model_dir": str(d), "require_onnx": True}).test_client()
    assert c.get("/v2/health/ready").status_code == 503
    assert calls == []
    with pytest.raises(AssertionError, match="joblib.load called"):  # the spy sits where an unpickle would go
        LoadedModel.load(fleet["dir"] / "3", require_onnx=False)
    assert len(calls) == 1


def _skewed_copy(fleet, tmp_path, versions):
    """The model dir with the manifests of ``versions`` saying another scikit-learn minor trained them."""
    import sklearn
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    other = f"{major}.{minor + 1}.0"
    d = tmp_path / "m"
    shutil.copytree(fleet["dir"], d, symlinks=True)
    for v in versions:
        p = d / str(v) / "manifest.json"
        m = json.loads(p.read_text())
        m["library_versions"]["scikit-learn"] = other
        p.write_text(json.dumps(m))
    (d / ".last-good").unlink(missing_ok=True)
    (d / "previous").unlink(missing_ok=True)
    return d, other


def test_sklearn_skew_refused_by_the_server_unless_allowed(fleet, tmp_path, monkeypatch, caplog):
    import sklearn
    monkeypatch.delenv("MLPIPE_ALLOW_SKLEARN_SKEW", raising=False)
    d, other = _skewed_copy(fleet, tmp_path, [1, 3])
    hostdir.activate(d, 3)  # pickle only
    (d / "previous").unlink(missing_ok=True)
    c = create_app({"model_dir": str(d)}).test_client()
    r = c.get("/v2/health/ready")
    assert r.status_code == 503
    assert other in r.json["error"] and sklearn.__version__ in r.json["error"] and "MLPIPE_ALLOW_SKLEARN_SKEW" in r.json["error"]
    monkeypatch.setenv("MLPIPE_ALLOW_SKLEARN_SKEW", "1")
    with caplog.at_level("WARNING"):
        c = create_app({"model_dir": str(d)}).test_client()
    assert c.get("/metadata").json["runtime"] == "sklearn"
    assert other in caplog.text
    # the ONNX path does not depend on scikit-learn: it loads (with a log note) without the override
    monkeypatch.delenv("MLPIPE_ALLOW_SKLEARN_SKEW")
    hostdir.activate(d, 1)
    caplog.clear()
    with caplog.at_level("INFO", logger="mlpipe.serve"):
        c = create_app({"model_dir": str(d)}).test_client()
    meta = c.get("/metadata").json
    assert meta["version"] == 1 and meta["runtime"] == "onnxruntime"
    assert other in caplog.text


def test_tampered_current_falls_back_to_last_good(fleet, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fleet["dir"], d, symlinks=True)
    hostdir.activate(d, 1)
    assert create_app({"model_dir": str(d)}).test_client().get("/metadata").json["version"] == 1
    hostdir.activate(d, 2)
    with open(d / "2" / "model.onnx", "ab") as f:
        f.write(b"\0")
    c = create_app({"model_dir": str(d)}).test_client()
    meta = c.get("/metadata").json
    assert meta["version"] == 1 and "sha256 mismatch" in meta["load_error"]
    assert "mlpipe_model_load_failures_total" in c.get("/metrics").data.decode()


def test_non_numeric_model_served_through_sklearn(tmp_path, write_spec):
    import pandas as pd
    df = pd.DataFrame({"color": ["red", "blue", "green"] * 40, "size": list(range(120)), "y": [0, 1, 1] * 40})
    df.to_csv(tmp_path / "c.csv", index=False)
    spec = small_spec("colors", data={"source": f"csv:{tmp_path / 'c.csv'}", "target": "y"},
                      model={"steps": [{"estimator": "sklearn.compose.make_column_transformer" if False else "sklearn.preprocessing.OneHotEncoder",
                                        "params": {"handle_unknown": "ignore"}},
                                       {"estimator": "sklearn.linear_model.LogisticRegression"}]})
    train_into(tmp_path / "reg", spec, write_spec)
    Registry(str(tmp_path / "reg")).pull("colors:1", tmp_path / "m")
    hostdir.activate(tmp_path / "m", 1)
    c = create_app({"model_dir": str(tmp_path / "m")}).test_client()
    r = c.post("/invocations", json={"dataframe_records": [{"color": "red", "size": 3}, {"color": "blue", "size": 4}]})
    assert r.status_code == 200 and len(r.json["predictions"]) == 2
    r = c.post("/invocations", json={"dataframe_records": [{"color": 5, "size": 3}]})
    assert r.status_code == 400 and "expected a string" in r.json["error"]
    r = c.post("/v2/models/colors/infer", json={"inputs": [
        {"name": "color", "shape": [1], "datatype": "BYTES", "data": ["green"]},
        {"name": "size", "shape": [1], "datatype": "INT64", "data": [7]}]})
    assert r.status_code == 200, r.json


# ---------------------------------------------------------------------------------- fuzzing
def test_fuzz_thousands_of_malformed_requests_never_5xx(client, data):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    frame, cols = data
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=5), st.sampled_from(cols))
    anyjson = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.one_of(st.text(max_size=5), st.sampled_from(cols)), kids, max_size=4)),
                           max_leaves=20)
    row = st.lists(st.one_of(st.floats(), st.integers(), st.none(), st.text(max_size=3)), min_size=28, max_size=31)
    mlflow_body = st.one_of(
        anyjson,
        st.fixed_dictionaries({"dataframe_split": st.fixed_dictionaries({"columns": st.one_of(st.just(cols), st.lists(st.sampled_from(cols), max_size=31), anyjson),
                                                                          "data": st.one_of(st.lists(row, max_size=3), anyjson)})}),
        st.fixed_dictionaries({"dataframe_records": st.lists(st.dictionaries(st.sampled_from(cols + ["x"]), scalars, max_size=31), max_size=3)}),
        st.fixed_dictionaries({"instances": st.one_of(st.lists(row, max_size=3), anyjson)}),
        st.fixed_dictionaries({"inputs": st.one_of(st.dictionaries(st.sampled_from(cols), st.lists(scalars, max_size=3)), anyjson)}),
    )
    tensor = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(cols + ["x"]), anyjson),
                                    "shape": st.one_of(st.lists(st.integers(-2, 40), max_size=3), anyjson),
                                    "datatype": st.one_of(st.sampled_from(["FP64", "FP32", "INT64", "BOOL", "BYTES", "FP8"]), anyjson),
                                    "data": st.one_of(st.lists(scalars, max_size=40), anyjson)},
                                   optional={"parameters": st.one_of(st.fixed_dictionaries({"binary_data_size": st.integers(-5, 500)}), anyjson)})
    oip_body = st.one_of(anyjson, st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=4)},
                                                        optional={"outputs": anyjson, "id": anyjson}))
    seen = {"n": 0}

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(mlflow_body.map(lambda b: ("/invocations", b, None)),
                     oip_body.map(lambda b: ("/v2/models/credit-risk/infer", b, None)),
                     st.binary(max_size=200).map(lambda b: ("/invocations", b, "text/csv")),
                     st.tuples(st.binary(max_size=200), st.integers(-3, 300)).map(lambda t: ("/v2/models/credit-risk/infer", t, "binary"))))
    def run(case):
        path, body, kind = case
        if kind == "text/csv":
            r = client.post(path, data=body, content_type="text/csv")
        elif kind == "binary":
            r = client.post(path, data=body[0], content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(body[1])})
        else:
            r = client.post(path, data=json.dumps(body, allow_nan=True), content_type="application/json")
        seen["n"] += 1
        assert r.status_code < 500, (body, r.data[:300])
        assert "error" in r.json if r.status_code >= 400 else True
    run()
    assert seen["n"] >= 1000


# --------------------------------------------------------------------------------- gunicorn
@pytest.fixture
def server(fleet, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fleet["dir"], d, symlinks=True)
    hostdir.activate(d, 1)
    s = Server(d, tmp_path)
    s.dir = d
    yield s
    s.stop()


def test_tritonclient_drives_the_oip_api(server, fleet, data):
    import tritonclient.http as httpclient
    frame, cols = data
    X = frame[cols].iloc[:3]
    want = _expected(fleet, 1, X)
    client = httpclient.InferenceServerClient(f"{server.host}:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("credit-risk")
    meta = client.get_model_metadata("credit-risk")
    assert [i["name"] for i in meta["inputs"]] == cols
    for binary in (False, True):
        inputs = []
        for c in cols:
            t = httpclient.InferInput(c, [3], "FP64")
            t.set_data_from_numpy(X[c].to_numpy(dtype=np.float64), binary_data=binary)
            inputs.append(t)
        outputs = [httpclient.InferRequestedOutput("predict", binary_data=False),
                   httpclient.InferRequestedOutput("predict_proba", binary_data=False)]
        res = client.infer("credit-risk", inputs, outputs=outputs)
        assert res.as_numpy("predict").tolist() == want
        assert res.as_numpy("predict_proba").shape == (3, 2)
    t = httpclient.InferInput("batch", [3, 30], "FP32")
    t.set_data_from_numpy(X.to_numpy(dtype=np.float32), binary_data=True)
    assert client.infer("credit-risk", [t]).as_numpy("predict").tolist() == want


def _load_loop(url, stop, results, body, max_seconds=240):
    import requests
    s = requests.Session()
    deadline = time.monotonic() + max_seconds  # bounded in time as well as by the stop event
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            r = s.post(f"{url}/invocations", json=body, timeout=10)
            results.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text[:200],
                            r.headers.get("X-Model-Version")))
        except Exception as exc:  # a failed request is a result too
            results.append((0, repr(exc), None))


def test_five_switches_under_load_zero_failures(server, data):
    import requests
    frame, cols = data
    body = {"dataframe_split": {"columns": cols, "data": frame[cols].head(2).values.tolist()}}
    stop, results = threading.Event(), []
    workers = [threading.Thread(target=_load_loop, args=(server.url, stop, results, body)) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        sequence = [2, 1, 2, 3, 2]
        for version in sequence:
            time.sleep(0.7)
            hostdir.activate(server.dir, version)
            t0 = time.monotonic()
            assert run_cli("reload", "--pidfile", server.pidfile).returncode == 0
            deadline = time.monotonic() + 30
            versions = set()
            while time.monotonic() < deadline:
                try:  # on a loaded machine new workers can take seconds to load: a slow poll is "not yet"
                    versions = {requests.get(f"{server.url}/metadata", timeout=10).json()["version"] for _ in range(6)}
                except requests.RequestException:
                    continue
                if versions == {version}:
                    break
                time.sleep(0.1)
            assert versions == {version}, versions
            print(f"switch to v{version}: {time.monotonic() - t0:.2f}s, {len(results)} requests so far")
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    failed = [r for r in results if r[0] != 200]
    assert len(results) > 100 and not failed, failed[:5]
    answered = {r[1] for r in results}
    assert answered <= {"1", "2", "3"} and {"1", "2", "3"} <= answered
    assert all(r[1] == r[2] for r in results)  # body and header name the same version
    metrics = requests.get(f"{server.url}/metrics").text
    assert 'version="2"} 1.0' in metrics and 'runtime="onnxruntime",version="1"} 1.0' not in metrics


def test_tampered_new_version_refused_old_keeps_serving(server):
    import requests
    with open(server.dir / "2" / "model.onnx", "r+b") as f:
        f.seek(50)
        f.write(b"\x00\x01")
    hostdir.activate(server.dir, 2)
    assert run_cli("reload", "--pidfile", server.pidfile).returncode == 0
    time.sleep(3)
    errors = set()
    for _ in range(10):
        meta = requests.get(f"{server.url}/metadata").json()
        assert meta["version"] == 1
        errors.add(meta["load_error"] or "")
    assert errors and all("sha256 mismatch" in e for e in errors), errors  # every new worker refused v2
    r = requests.post(f"{server.url}/invocations", json={"instances": [[1.0] * 30]})
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    assert "mlpipe_model_load_failures_total" in requests.get(f"{server.url}/metrics").text


def test_plain_gunicorn_command_aggregates_metrics_over_workers(fleet, tmp_path, data):
    """The documented bare command, without mlpipe's gunicorn config: metrics still cover every worker."""
    import subprocess
    import sys
    import requests
    from conftest import free_port, stop, wait_port
    d = tmp_path / "m"
    shutil.copytree(fleet["dir"], d, symlinks=True)
    hostdir.activate(d, 1)
    port = free_port()
    env = {**os.environ, "MLPIPE_MODEL_DIR": str(d)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}",
                             "mlpipe.serve:create_app()"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc)
        frame, cols = data
        from concurrent.futures import ThreadPoolExecutor
        body = {"instances": frame[cols].head(100).values.tolist()}

        def call(_):
            r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body)
            meta = requests.get(f"http://127.0.0.1:{port}/metadata").json()
            return r.status_code, meta["pid"]
        with ThreadPoolExecutor(6) as pool:  # concurrent: sync workers take one request each at a time
            results = list(pool.map(call, range(60)))
        assert {status for status, _ in results} == {200}
        assert len({pid for _, pid in results}) == 2  # both workers answered
        time.sleep(1.2)  # batched counters are written within 0.5 s
        for _ in range(4):  # whichever worker answers the scrape reports every worker's requests
            text = requests.get(f"http://127.0.0.1:{port}/metrics").text
            line = [x for x in text.splitlines() if x.startswith('mlpipe_requests_total{endpoint="/invocations",model="credit-risk",status="200"}')]
            assert line and float(line[0].split()[-1]) == 60.0, line
    finally:
        stop(proc)


def test_observe_many_matches_prometheus_observe():
    """The batched histogram write (it uses prometheus-client internals) equals observe() one by one."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from mlpipe.serve import VALUE_BUCKETS, _observe_many
    values = [-5000.0, -1.0, 0.0, 0.5, 1.0, 10.0, 49.9, 50.0, 299.0, 1e3, 1e5]
    one, batched = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("v", "v", buckets=VALUE_BUCKETS, registry=one)
    for x in values:
        h1.observe(x)
    _observe_many(Histogram("v", "v", buckets=VALUE_BUCKETS, registry=batched), values, VALUE_BUCKETS)
    strip = lambda text: [line for line in text.decode().splitlines() if "_created" not in line]  # noqa: E731
    assert strip(generate_latest(one)) == strip(generate_latest(batched))


def test_regressor_prediction_histogram(tmp_path):
    reg = tmp_path / "reg"
    assert run_cli("train", EXAMPLES / "house-prices.yml", "--registry", reg).returncode == 0
    Registry(str(reg)).pull("house-prices:1", tmp_path / "m")
    hostdir.activate(tmp_path / "m", 1)
    c = create_app({"model_dir": str(tmp_path / "m")}).test_client()
    import pandas as pd
    frame = pd.read_csv(EXAMPLES / "data" / "diabetes.csv").drop(columns=["target"]).head(7)
    r = c.post("/invocations", json={"dataframe_records": frame.to_dict(orient="records")})
    assert r.status_code == 200 and len(r.json["predictions"]) == 7
    text = c.get("/metrics").data.decode()
    count = [x for x in text.splitlines() if x.startswith('mlpipe_prediction_value_count{model="house-prices",version="1"}')]
    assert count and float(count[0].split()[-1]) >= 7


def test_not_ready_says_what_to_do(fleet, tmp_path):
    """An empty folder, a folder with pulled but no active version, a folder that does not exist:
    readiness and predictions answer 503 with the command that fixes it; `models pull` without
    --activate into a folder with nothing active says so too."""
    body = {"dataframe_split": {"columns": ["a"], "data": [[1]]}}
    missing = tmp_path / "nowhere"
    r = create_app({"model_dir": str(missing)}).test_client().get("/v2/health/ready")
    assert r.status_code == 503 and f"{missing} does not exist" in r.json["error"]
    assert f"--dest {missing} --activate" in r.json["error"]
    empty = tmp_path / "empty"
    empty.mkdir()
    c = create_app({"model_dir": str(empty)}).test_client()
    for r in (c.get("/v2/health/ready"), c.post("/invocations", json=body)):
        assert r.status_code == 503, r.json
        assert f"nothing is pulled into {empty}" in r.json["error"] and "no reload needed" in r.json["error"], r.json
    res = run_cli("models", "pull", "credit-risk:2", "--dest", empty, "--registry", fleet["reg"])
    assert res.returncode == 0, res.stderr
    assert f"add --activate to serve it (mlpipe models pull credit-risk:2 --dest {empty} --activate)" in res.stdout
    r = create_app({"model_dir": str(empty)}).test_client().get("/v2/health/ready")
    assert r.status_code == 503
    assert (f"v2 is pulled into {empty} but none is active (no 'current' symlink): run "
            f"`mlpipe models pull credit-risk:2 --dest {empty} --activate` (nothing is downloaded again)") in r.json["error"]
    # doing what it says makes the running server ready (it follows the link: no reload); a pull into
    # an active folder adds no note
    res = run_cli("models", "pull", "credit-risk:2", "--dest", empty, "--registry", fleet["reg"], "--activate")
    assert res.returncode == 0 and "changed" not in res.stdout and "[current]" in res.stdout, res.stdout
    deadline = time.monotonic() + 10
    while (r := c.get("/v2/health/ready")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.status_code == 200 and r.json["version"] == 2, r.json
    assert create_app({"model_dir": str(empty)}).test_client().get("/v2/health/ready").status_code == 200
    res = run_cli("models", "pull", "credit-risk:1", "--dest", empty, "--registry", fleet["reg"])
    assert res.returncode == 0 and "not active" not in res.stdout


# ------------------------------------------------------------------------- request ids and capture
def _capture_app(fleet, tmp_path, **cfg):
    from mlpipe import serve
    app = create_app({"model_dir": str(fleet["dir"]), "capture_db": f"sqlite:///{tmp_path}/capture.db",
                      "host": "host-a", **cfg})
    return app.test_client(), serve.metrics().capture_source


def test_every_prediction_answer_carries_a_request_id(client, data):
    frame, cols = data
    rows = frame[cols].head(2).values.tolist()
    r = client.post("/invocations", json={"instances": rows})
    rid = r.headers["X-Request-Id"]
    assert r.status_code == 200 and r.json["request_id"] == rid and len(rid) >= 16
    assert client.post("/invocations", json={"instances": rows}).headers["X-Request-Id"] != rid  # a new one each time
    r = client.post("/invocations", json={"instances": rows}, headers={"X-Request-Id": "order-42.a:b_c"})
    assert r.headers["X-Request-Id"] == "order-42.a:b_c" == r.json["request_id"]  # the client's own is kept
    for hostile in ("x" * 65, "a b", "<script>", "id\u00e9"):
        r = client.post("/invocations", json={"instances": rows}, headers={"X-Request-Id": hostile})
        assert r.status_code == 200 and r.headers["X-Request-Id"] != hostile and r.json["request_id"] == r.headers["X-Request-Id"]
    oip = {"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP64", "data": rows[0]}]}
    r = client.post("/v2/models/credit-risk/infer", json=oip)
    assert r.status_code == 200 and r.json["id"] == r.json["request_id"] == r.headers["X-Request-Id"]
    r = client.post("/v2/models/credit-risk/infer", json={**oip, "id": "client-7"})
    assert r.json["id"] == "client-7" and r.json["request_id"] == r.headers["X-Request-Id"]  # OIP echoes its id
    r = client.post("/invocations", json={"instances": [[1.0] * 29]})  # refused: still has an id for the logs
    assert r.status_code == 400 and r.headers["X-Request-Id"]


def test_sampled_predictions_are_captured_with_inputs_and_latency(fleet, tmp_path, data):
    from mlpipe import capture
    frame, cols = data
    c, cap = _capture_app(fleet, tmp_path, capture_sample=1)
    ids = []
    for i in range(5):
        r = c.post("/invocations", json={"instances": frame[cols].iloc[i:i + 2].values.tolist()})
        ids.append((r.headers["X-Request-Id"], r.json["predictions"]))
    r = c.post("/v2/models/credit-risk/infer", json={"inputs": [{"name": f, "shape": [1], "datatype": "FP64",
                                                                 "data": [float(frame[f].iloc[9])]} for f in cols]})
    ids.append((r.json["request_id"], r.json["outputs"][0]["data"]))
    cap.flush()
    got = capture.Store(f"sqlite:///{tmp_path}/capture.db").predictions("credit-risk")
    assert len(got) == 11
    for rid, preds in ids:
        mine = got[got.request_id == rid].sort_values("row")
        assert mine.prediction.tolist() == preds and set(mine.version) == {1} and set(mine.host) == {"host-a"}
        assert (mine.latency_ms > 0).all()
    first = got[(got.request_id == ids[0][0]) & (got.row == 1)].iloc[0]
    assert [first[f] for f in cols] == pytest.approx(frame[cols].iloc[1].tolist())
    text = c.get("/metrics").data.decode()
    assert "mlpipe_capture_rows_total" in text


def test_capture_share_zero_records_nothing(fleet, tmp_path, data):
    from mlpipe import capture
    frame, cols = data
    c, cap = _capture_app(fleet, tmp_path, capture_sample=0)
    for _ in range(20):
        assert c.post("/invocations", json={"instances": frame[cols].head(1).values.tolist()}).status_code == 200
    cap.flush()
    assert capture.Store(f"sqlite:///{tmp_path}/capture.db").count("credit-risk") == 0


@pytest.mark.parametrize("value", [-0.1, 1.5, "lots", True])
def test_bad_capture_settings_are_refused(fleet, value):
    from mlpipe.errors import UsageError
    with pytest.raises(UsageError, match="capture_sample"):
        create_app({"model_dir": str(fleet["dir"]), "capture_sample": value})


def test_feedback_route_attaches_labels(fleet, tmp_path, data):
    from mlpipe import capture
    frame, cols = data
    c, cap = _capture_app(fleet, tmp_path, capture_sample=1)
    rid = c.post("/invocations", json={"instances": frame[cols].head(2).values.tolist()}).json["request_id"]
    cap.flush()
    r = c.post("/feedback", json=[{"request_id": rid, "label": 1}, {"request_id": rid, "row": 1, "label": 0},
                                  {"request_id": "never-seen", "label": 1}])
    assert r.status_code == 200, r.json
    assert (r.json["stored"], r.json["matched"], r.json["unmatched"]) == (3, 2, 1)
    got = capture.Store(f"sqlite:///{tmp_path}/capture.db").predictions("credit-risk", labelled=True)
    assert sorted(zip(got.row, got.label)) == [(0, 1), (1, 0)]
    for body, why in [({"label": 1}, "request_id"), ({"request_id": rid}, "label"),
                      ({"request_id": rid, "label": {"a": 1}}, "label"), ({"request_id": rid, "label": 1, "row": -1}, "row"),
                      ({"request_id": rid, "label": 1, "colour": "red"}, "unknown key"), ([], "no labels"),
                      ({"request_id": "a b", "label": 1}, "request_id"),
                      ({"request_id": rid, "label": "yes"}, "not a class of credit-risk v1 (0, 1)"),
                      ({"request_id": rid, "label": 7}, "not a class"), ({"request_id": rid, "label": True}, "not a class")]:
        r = c.post("/feedback", json=body)
        assert r.status_code == 400 and why in r.json["error"], (body, r.json)


def test_a_dead_capture_database_costs_rows_not_predictions(fleet, tmp_path, data):
    """Nothing listens on the database's port: every prediction still answers 200, the rows are counted
    as dropped, and POST /feedback says the labels were not stored (503)."""
    from conftest import free_port
    frame, cols = data
    c, cap = _capture_app(fleet, tmp_path, capture_sample=1,
                          capture_db=f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    t0 = time.perf_counter()
    for _ in range(50):
        assert c.post("/invocations", json={"instances": frame[cols].head(1).values.tolist()}).status_code == 200
    assert time.perf_counter() - t0 < 30  # generous: no request waited for a connect timeout each
    cap.flush()
    text = c.get("/metrics").data.decode()
    dropped = [x for x in text.splitlines() if x.startswith("mlpipe_capture_dropped_rows_total")]
    assert dropped and sum(float(x.split()[-1]) for x in dropped) >= 50, dropped
    r = c.post("/feedback", json={"request_id": "abc", "label": 1})
    assert r.status_code == 503 and "not stored" in r.json["error"]


def test_checks_can_keep_their_rows_out_of_capture(fleet, tmp_path, data):
    """The deploy's and the monitor's checks send X-Mlpipe-Capture: off: their holdout rows are not live traffic."""
    from mlpipe import capture
    frame, cols = data
    c, cap = _capture_app(fleet, tmp_path, capture_sample=1)
    body = {"instances": frame[cols].head(1).values.tolist()}
    assert c.post("/invocations", json=body, headers={"X-Mlpipe-Capture": "off"}).status_code == 200
    oip = {"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP64", "data": body["instances"][0]}]}
    assert c.post("/v2/models/credit-risk/infer", json=oip, headers={"X-Mlpipe-Capture": "OFF"}).status_code == 200
    rid = c.post("/invocations", json=body).json["request_id"]
    cap.flush()
    assert capture.Store(f"sqlite:///{tmp_path}/capture.db").predictions("credit-risk").request_id.tolist() == [rid]


# ------------------------------------------------------------------------------ multi-model hosts
@pytest.fixture(scope="module")
def models_root(fleet):
    """A folder of model folders: credit-risk (v1..v3, v1 active) and hello-world (iris, v1)."""
    root = fleet["tmp"] / "multi"
    root.mkdir()
    shutil.copytree(fleet["dir"], root / "credit-risk", symlinks=True)
    assert run_cli("train", EXAMPLES / "hello-world.yml", "--registry", fleet["reg"]).returncode == 0
    assert run_cli("train", EXAMPLES / "house-prices.yml", "--registry", fleet["reg"]).returncode == 0
    res = run_cli("models", "pull", "hello-world:1", "--dest", root / "hello-world", "--registry", fleet["reg"], "--activate")
    assert res.returncode == 0, res.stderr
    return root


def _iris_rows(n=3):
    from sklearn.datasets import load_iris
    frame = load_iris(as_frame=True).frame
    cols = [c for c in frame.columns if c != "target"]
    return {"dataframe_split": {"columns": cols, "data": frame[cols].head(n).values.tolist()}}, cols


def test_multi_model_host_routes_by_name(models_root, fleet, data, tmp_path):
    """One server, two models: each answers under its name (MLflow-style per model, OIP v2); the
    unnamed routes say which names to use; readiness lists both; metrics carry the model."""
    root = tmp_path / "models"
    shutil.copytree(models_root, root, symlinks=True)
    c = create_app({"models_dir": str(root)}).test_client()
    frame, cols = data
    r = c.post("/models/credit-risk/invocations", json={"dataframe_split": {"columns": cols, "data": frame[cols].head(2).values.tolist()}})
    assert r.status_code == 200 and r.json["model_version"] == "1" and r.headers["X-Model-Version"] == "1", r.json
    iris, icols = _iris_rows()
    r = c.post("/models/hello-world/invocations", json=iris)
    assert r.status_code == 200 and len(r.json["predictions"]) == 3, r.json
    oip = {"inputs": [{"name": n, "datatype": "FP64", "shape": [1], "data": [v]} for n, v in zip(icols, iris["dataframe_split"]["data"][0])]}
    r = c.post("/v2/models/hello-world/infer", json=oip)
    assert r.status_code == 200 and r.json["model_name"] == "hello-world", r.json
    assert c.get("/v2/models/credit-risk/ready").status_code == 200
    assert c.get("/models/hello-world/metadata").json["name"] == "hello-world"
    # unnamed routes on a host with two models: a 400 that says what to send instead
    r = c.post("/invocations", json=iris)
    assert r.status_code == 400 and "serves 2 models (credit-risk, hello-world)" in r.json["error"], r.json
    assert "/models/<name>/invocations" in r.json["error"]
    r = c.post("/models/nope/invocations", json=iris)
    assert r.status_code == 404 and "'credit-risk'" in r.json["error"], r.json
    r = c.get("/v2/health/ready")
    assert r.status_code == 200 and r.json["models"] == {"credit-risk": {"version": 1}, "hello-world": {"version": 1}}
    text = c.get("/metrics").data.decode()
    assert 'mlpipe_requests_total{endpoint="/models/<name>/invocations",model="hello-world",status="200"}' in text
    assert 'mlpipe_requests_total{endpoint="/models/<name>/invocations",model="",status="404"}' in text  # no made-up series
    assert 'mlpipe_predicted_rows_total{model="hello-world",version="1"}' in text


def test_multi_model_host_follows_folders_without_a_reload(models_root, fleet, data, tmp_path):
    """gunicorn, 2 workers, a steady load on hello-world while credit-risk switches versions three
    times, house-prices is added and then removed: hello-world never fails, every change is served
    within seconds, and no worker restarts."""
    import requests
    root = tmp_path / "models"
    shutil.copytree(models_root, root, symlinks=True)
    server = Server(root, tmp_path, multi=True)
    try:
        def workers():  # the gunicorn master's children
            master = int(server.pidfile.read_text())
            return {int(p) for f in Path(f"/proc/{master}/task").glob("*/children") for p in f.read_text().split()}
        deadline = time.monotonic() + 30  # gunicorn spawns workers one by one; ready means one answered
        while len(pids := workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2, pids
        iris, _ = _iris_rows(1)
        stop, results = threading.Event(), []
        loaders = [threading.Thread(target=_load_loop, args=(f"{server.url}/models/hello-world", stop, results, iris))
                   for _ in range(2)]
        for t in loaders:
            t.start()

        def until(check, what, timeout=30):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if check():
                        return
                except requests.RequestException:
                    pass
                time.sleep(0.05)
            raise AssertionError(f"not within {timeout} s: {what}")
        try:
            from mlpipe.fleet import served_versions
            for v in (2, 3, 1):
                hostdir.activate(root / "credit-risk", v)
                until(lambda: served_versions(server.url, None, "credit-risk") == {v}, f"credit-risk v{v} on every worker")
            res = run_cli("models", "pull", "house-prices:1", "--dest", root / "house-prices", "--registry", fleet["reg"], "--activate")
            assert res.returncode == 0, res.stderr
            until(lambda: all(requests.get(f"{server.url}/v2/models/house-prices/ready").status_code == 200 for _ in range(6)),
                  "house-prices served by every worker")
            shutil.rmtree(root / "house-prices")
            until(lambda: all(requests.get(f"{server.url}/v2/models/house-prices/ready").status_code == 404 for _ in range(6)),
                  "house-prices dropped")
            time.sleep(0.5)
        finally:
            stop.set()
            for t in loaders:
                t.join(30)
        failed = [r for r in results if r[0] != 200]
        assert len(results) > 50 and not failed, failed[:5]
        assert workers() == pids and server.proc.poll() is None  # the same workers: nothing was reloaded
    finally:
        server.stop()
