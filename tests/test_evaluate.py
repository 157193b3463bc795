"""mlpipe evaluate: offline on a registered version, and live against a running server."""
import json

import pytest

from mlpipe import hostdir
from mlpipe.registry import Registry
from conftest import EXAMPLES, Server, free_port, run_cli, small_spec


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    reg = tmp / "reg"
    for message in ("v1", "v2"):
        assert run_cli("train", EXAMPLES / "credit-risk.yml", "-m", message, "--registry", reg).returncode == 0
    Registry(str(reg)).pull("credit-risk:2", tmp / "m")
    hostdir.activate(tmp / "m", 2)
    from sklearn.datasets import load_breast_cancer
    load_breast_cancer(as_frame=True).frame.sample(120, random_state=3).to_csv(tmp / "holdout.csv", index=False)
    server = Server(tmp / "m", tmp)
    yield {"url": server.url, "reg": reg, "holdout": f"csv:{tmp / 'holdout.csv'}", "model_dir": tmp / "m"}
    server.stop()


def ev(live, *args):
    return run_cli("evaluate", "--endpoint", live["url"], "--registry", live["reg"], *args)


def test_live_pass_with_report(live):
    r = ev(live, "--model", "credit-risk", "--expect-version", "2", "--data", live["holdout"], "--min", "accuracy=0.85",
           "--max-regression", "accuracy=0.02", "--against", "credit-risk:1", "--max-p99-ms", "5000", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["version"] == 2 and report["runtime"] == "onnxruntime" and report["passed"]
    assert report["data"]["rows"] == 120 and 0.85 <= report["metrics"]["accuracy"] <= 1
    assert {c["check"] for c in report["checks"]} == {"min", "max_regression", "max_p99_ms"}
    assert report["latency_ms"]["requests"] == 50 and report["latency_ms"]["p99"] >= report["latency_ms"]["p50"] > 0
    # the live accuracy is the model's own accuracy on the same rows, computed offline
    offline = json.loads(run_cli("evaluate", "credit-risk:2", "--data", live["holdout"], "--registry", live["reg"], "--json").stdout)
    assert report["metrics"]["accuracy"] == pytest.approx(offline["metrics"]["accuracy"])


def test_live_metric_and_latency_failures_exit_1(live):
    r = ev(live, "--data", live["holdout"], "--min", "accuracy=0.999")
    assert r.returncode == 1 and "FAIL accuracy" in r.stdout
    r = ev(live, "--max-p99-ms", "0.001")
    assert r.returncode == 1 and "latency p99" in r.stdout


def test_unhealthy_or_wrong_version_exit_2(live):
    r = ev(live, "--expect-version", "1")
    assert r.returncode == 2 and "serves credit-risk v2, expected v1" in r.stderr
    r = ev(live, "--model", "other")
    assert r.returncode == 2 and "does not serve the expected model 'other'" in r.stderr and "'credit-risk'" in r.stderr, r.stderr
    r = run_cli("evaluate", "--endpoint", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (("--endpoint", "localhost:8000"), "not an http(s) URL"),
    (("--endpoint", "http://x", "--min", "accuracy=0.9"), "metric thresholds need --data, or --registry"),
    (("credit-risk:1", "--endpoint", "http://x"), "not both"),
    (("credit-risk:1", "--expect-version", "2"), "need --endpoint"),
    ((), "needs a model reference or --endpoint"),
])
def test_usage_errors_exit_3(args, message):
    r = run_cli("evaluate", *args)
    assert r.returncode == 3 and message in r.stderr, r.stderr


# ------------------------------------------------------------ offline: the stored holdout, require_onnx
def _register(reg, spec_dict, write_spec, tmp_path, onnx=None, old_style=False, monkeypatch=None):
    """Train a spec in process and register it; ``old_style``: as versions were before holdout.parquet."""
    import uuid
    from mlpipe import artifact, spec, train
    if old_style:
        original = artifact.write_dir

        def write_without_holdout(dest, model, manifest, extra_files=None):
            extra_files = {k: v for k, v in (extra_files or {}).items() if k != train.HOLDOUT_FILE}
            manifest = dict(manifest, data={k: v for k, v in manifest["data"].items() if k != "holdout"},
                            split={k: v for k, v in manifest["split"].items() if k != "shuffle"})
            return original(dest, model, manifest, extra_files)
        monkeypatch.setattr(artifact, "write_dir", write_without_holdout)
    work = tmp_path / f"work-{uuid.uuid4().hex[:6]}"
    train.train(spec.load(write_spec(spec_dict, name=f"{work.name}.yml")), work, onnx=onnx)
    if old_style:
        monkeypatch.setattr(artifact, "write_dir", original)
    return Registry(str(reg)).register(work)


def _never_read_sklearn_data(monkeypatch):
    from mlpipe import data

    def refuse(name):
        raise AssertionError(f"the training source sklearn:{name} was read")
    monkeypatch.setattr(data, "_sklearn", refuse)


def test_offline_without_data_scores_the_stored_holdout(tmp_path, write_spec, monkeypatch):
    from mlpipe import evaluate
    reg = tmp_path / "reg"
    m = _register(reg, small_spec(), write_spec, tmp_path)
    _never_read_sklearn_data(monkeypatch)
    report = evaluate.offline(Registry(str(reg)), "toy:1", None)
    assert report["data"]["source"] == "toy:1/holdout.parquet"
    assert report["data"]["holdout"] == m["data"]["holdout"] and report["data"]["rows"] == m["data"]["test_rows"]
    assert report["data"]["fingerprint"] == m["data"]["holdout"]["fingerprint"]
    assert report["metrics"] == m["metrics"]  # the rows it was scored on at training time
    assert report["passed"] and report["runtime"] == "sklearn"


def test_cli_offline_without_data_uses_the_stored_holdout(tmp_path, write_spec):
    reg = tmp_path / "reg"
    m = _register(reg, small_spec(), write_spec, tmp_path)
    r = run_cli("evaluate", "toy:1", "--registry", reg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"toy:1 (sklearn) on its stored holdout.parquet ({m['data']['test_rows']} rows, from test split)"
    # the stored holdout is verified like the model: a tampered copy in the registry is refused
    f = reg / "toy" / "versions" / "1" / "holdout.parquet"
    import pandas as pd
    pd.read_parquet(f).assign(target=0).to_parquet(f, index=False)
    r = run_cli("evaluate", "toy:1", "--registry", reg)
    assert r.returncode == 6 and "holdout.parquet" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_old_version_without_holdout_recomputes_its_test_split(tmp_path, write_spec, monkeypatch):
    from mlpipe import evaluate
    reg = tmp_path / "reg"
    m = _register(reg, small_spec(split={"test_size": 0.3, "random_state": 11, "stratify": True, "shuffle": True}),
                  write_spec, tmp_path, old_style=True, monkeypatch=monkeypatch)
    assert "holdout.parquet" not in m["files"] and "holdout" not in m["data"] and "shuffle" not in m["split"]
    report = evaluate.offline(Registry(str(reg)), "toy:1", None)
    assert report["data"]["rows"] == m["data"]["test_rows"] != m["data"]["rows"]
    assert "recomputed" in report["data"]["source"] and "holdout" not in report["data"]
    assert report["metrics"] == m["metrics"]  # the same rows the version was scored on


def test_old_version_whose_training_source_changed_is_refused(tmp_path, write_spec, monkeypatch):
    from mlpipe import data, evaluate
    from mlpipe.errors import DataError
    csv = tmp_path / "train.csv"
    data.load("sklearn:breast_cancer").frame.to_csv(csv, index=False)
    reg = tmp_path / "reg"
    _register(reg, small_spec(data={"source": f"csv:{csv}", "target": "target"}), write_spec, tmp_path,
              old_style=True, monkeypatch=monkeypatch)
    data.load("sklearn:breast_cancer").frame.iloc[::-1].to_csv(csv, index=False)  # same rows, new order
    with pytest.raises(DataError, match="stores no holdout.*changed since it was trained"):
        evaluate.offline(Registry(str(reg)), "toy:1", None)


def _no_unpickling(monkeypatch):
    import joblib

    def refuse(*a, **k):
        raise AssertionError("joblib.load was called")
    monkeypatch.setattr(joblib, "load", refuse)


def test_require_onnx_scores_the_onnx_graph_and_never_unpickles(tmp_path, write_spec, monkeypatch):
    from mlpipe import evaluate
    from mlpipe.serve import LoadedModel
    reg = tmp_path / "reg"
    for _ in range(2):
        _register(reg, small_spec(), write_spec, tmp_path)
    r = Registry(str(reg))
    X, y = evaluate.frame_for(r.manifest("toy", 1), "sklearn:breast_cancer")[1:]
    sklearn_scores = evaluate.score_version(r, "toy", 2, ["accuracy", "roc_auc"], X, y)
    runs = []
    original = LoadedModel.load.__func__
    monkeypatch.setattr(LoadedModel, "load", classmethod(lambda cls, *a, **k: runs.append(a) or original(cls, *a, **k)))
    _no_unpickling(monkeypatch)
    onnx_scores = evaluate.score_version(r, "toy", 2, ["accuracy", "roc_auc"], X, y, require_onnx=True)
    assert len(runs) == 1 and onnx_scores == pytest.approx(sklearn_scores, abs=1e-9)
    # offline: the version and the regression baseline, both through onnxruntime
    report = evaluate.offline(r, "toy:2", None, {"max_regression": {"accuracy": 0.0}}, against="toy:1", require_onnx=True)
    assert len(runs) == 3 and report["runtime"] == "onnxruntime" and report["baseline"] == "toy:1" and report["passed"]
    assert report["metrics"]["accuracy"] == pytest.approx(r.manifest("toy", 2)["metrics"]["accuracy"])
    with pytest.raises(AssertionError, match="joblib.load"):  # the guard works: without the flag it unpickles
        evaluate.score_version(r, "toy", 2, ["accuracy"], X, y)
    monkeypatch.setenv("MLPIPE_REQUIRE_ONNX", "1")  # the environment turns it on too
    assert evaluate.score_version(r, "toy", 2, ["accuracy"], X, y)["accuracy"] == onnx_scores["accuracy"]


def test_require_onnx_refuses_a_version_without_model_onnx(tmp_path, write_spec, monkeypatch):
    from mlpipe import evaluate
    from mlpipe.errors import IntegrityError
    reg = tmp_path / "reg"
    _register(reg, small_spec(), write_spec, tmp_path, onnx=False)
    r = Registry(str(reg))
    _no_unpickling(monkeypatch)
    with pytest.raises(IntegrityError, match="toy:1 has no model.onnx and require_onnx refuses to unpickle model.joblib"):
        evaluate.offline(r, "toy:1", None, require_onnx=True)
    monkeypatch.setenv("MLPIPE_REQUIRE_ONNX", "1")
    with pytest.raises(IntegrityError, match="no model.onnx"):
        evaluate.offline(r, "toy:1", None)
    monkeypatch.delenv("MLPIPE_REQUIRE_ONNX")
    res = run_cli("evaluate", "toy:1", "--require-onnx", "--registry", reg)
    assert res.returncode == 6 and "no model.onnx" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = run_cli("evaluate", "toy:1", "--registry", reg, env={"MLPIPE_REQUIRE_ONNX": "1"})
    assert res.returncode == 6 and "no model.onnx" in res.stderr


# ------------------------------------------------------------------- live: the served version's holdout
def test_live_without_data_scores_the_served_versions_stored_holdout(live):
    r = ev(live, "--model", "credit-risk", "--expect-version", "2", "--min", "accuracy=0.85",
           "--max-regression", "accuracy=0.02", "--against", "credit-risk:1", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    manifest = Registry(str(live["reg"])).manifest("credit-risk", 2)
    assert report["data"]["source"] == "credit-risk:2/holdout.parquet" and report["data"]["holdout"]["source"] == "test split"
    assert report["data"]["rows"] == manifest["data"]["test_rows"]
    assert report["metrics"]["accuracy"] == pytest.approx(manifest["metrics"]["accuracy"])
    assert report["baseline"] == "credit-risk:1" and report["passed"]
    # the same file, pulled onto the host with the version, is what a deploy passes as --data
    r = ev(live, "--data", f"parquet:{live['model_dir']}/2/holdout.parquet", "--min", "accuracy=0.85", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["metrics"] == report["metrics"]
