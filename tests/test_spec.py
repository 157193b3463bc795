import pytest

from mlpipe import spec
from mlpipe.errors import SpecError
from conftest import EXAMPLES, small_spec


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yml")))
def test_examples_validate(path):
    s = spec.load(path)
    assert s.name == path.stem


def test_malformed_yaml_names_line(write_spec):
    p = write_spec("name: x\ndata: [unclosed\n  model: 1\n")
    with pytest.raises(SpecError, match=r"malformed YAML at line \d+"):
        spec.load(p)


def test_unknown_key_names_key_and_choices(write_spec):
    p = write_spec(small_spec(modle={"estimator": "x"}))
    with pytest.raises(SpecError, match=r"unknown key 'modle'.*expected one of: alerts, capture, data, description, gate"):
        spec.load(p)


def test_unknown_nested_key(write_spec):
    s = small_spec()
    s["split"]["seed"] = 3
    with pytest.raises(SpecError, match=r"unknown key 'split.seed'.*random_state"):
        spec.load(write_spec(s))


def test_unknown_estimator(write_spec):
    s = small_spec(model={"estimator": "sklearn.tree.DecisionTreeClasifier"})
    with pytest.raises(SpecError, match=r"unknown estimator 'sklearn.tree.DecisionTreeClasifier'.*has no 'DecisionTreeClasifier'"):
        spec.load(write_spec(s))
    s = small_spec(model={"estimator": "nosuchpkg.Model"})
    with pytest.raises(SpecError, match=r"cannot import module 'nosuchpkg'"):
        spec.load(write_spec(s))


def test_unknown_param(write_spec):
    s = small_spec(model={"estimator": "sklearn.tree.DecisionTreeClassifier", "params": {"depth": 3}})
    with pytest.raises(SpecError, match=r"unknown parameter\(s\) depth.*max_depth"):
        spec.load(write_spec(s))


def test_unknown_metric(write_spec):
    with pytest.raises(SpecError, match=r"unknown metric 'acuracy'"):
        spec.load(write_spec(small_spec(metrics=["acuracy"])))


def test_gate_metric_must_be_measured(write_spec):
    with pytest.raises(SpecError, match=r"gate.min.r2' names a metric that is not in 'metrics'"):
        spec.load(write_spec(small_spec(gate={"min": {"r2": 0.5}})))


@pytest.mark.parametrize("name", ["Credit", "credit_risk", "-x", ""])
def test_bad_names(write_spec, name):
    with pytest.raises(SpecError):
        spec.load(write_spec(small_spec(name=name)))


def test_missing_required(write_spec):
    s = small_spec()
    del s["model"]
    with pytest.raises(SpecError, match=r"missing required key 'model'"):
        spec.load(write_spec(s))


def test_wrong_type(write_spec):
    with pytest.raises(SpecError, match=r"'split.test_size' must be"):
        spec.load(write_spec(small_spec(split={"test_size": "a lot"})))


def test_unsupported_source(write_spec):
    s = small_spec()
    s["data"]["source"] = "ftp://x/y.csv"
    with pytest.raises(SpecError, match=r"data.source.*unsupported data source"):
        spec.load(write_spec(s))


def test_pipeline_steps(write_spec):
    s = small_spec(model={"steps": [{"estimator": "sklearn.preprocessing.StandardScaler"},
                                    {"estimator": "sklearn.svm.SVC", "params": {"C": 2.0}}]})
    loaded = spec.load(write_spec(s))
    assert "SVC" in loaded.estimator_path
    s["model"]["steps"][1]["params"] = {"cee": 1}
    with pytest.raises(SpecError, match=r"model.steps\[1\].params' has unknown parameter"):
        spec.load(write_spec(s))


def test_relative_csv_is_relative_to_spec():
    s = spec.load(EXAMPLES / "house-prices.yml")
    assert s.data["source"] == "csv:" + str((EXAMPLES / "data" / "diabetes.csv").resolve())


# ------------------------------------------------------------------ capture, alerts, notify, monitor
def test_monitoring_defaults(write_spec):
    s = spec.load(write_spec(small_spec()))
    assert s.capture == spec.CAPTURE_DEFAULTS and s.alerts == []
    assert s.notify == spec.NOTIFY_DEFAULTS and s.monitor == spec.MONITOR_DEFAULTS


def test_monitoring_sections_parse(write_spec):
    s = spec.load(write_spec(small_spec(
        capture={"sample": 0.5, "max_age": "7d"},
        alerts=[{"when": "accuracy < 0.80", "min_labelled": 200, "do": ["notify", "retrain"]},
                {"when": "drift_mean radius > 0.2", "window": "24h"},
                "p99_ms >= 50"],
        notify={"webhook": "https://hooks.example/ml", "repeat": "30m"},
        monitor={"window": "2h", "endpoints": ["http://10.0.0.5:8080"], "schedule": "*/10 * * * *"})))
    assert s.capture["sample"] == 0.5 and s.capture["max_rows"] == 1_000_000
    a, d, p = s.alerts
    assert (a["metric"], a["op"], a["threshold"], a["min_labelled"], a["do"], a["window"]) == \
        ("accuracy", "<", 0.8, 200, ["notify", "retrain"], None)
    assert (d["metric"], d["window"], d["do"]) == ("drift_mean radius", "24h", ["notify"])
    assert (p["metric"], p["op"], p["threshold"], p["when"]) == ("p99_ms", ">=", 50.0, "p99_ms >= 50")
    assert s.notify == {"webhook": "https://hooks.example/ml", "repeat": "30m", "timeout": 5, "retries": 3}
    assert s.monitor["window"] == "2h" and s.monitor["endpoints"] == ["http://10.0.0.5:8080"]


@pytest.mark.parametrize("overrides, message", [
    ({"alerts": [{"when": "accuracy << 0.8"}]}, r"spec.yml: 'alerts\[0\].when' 'accuracy << 0.8' is not an alert condition.*OP one of"),
    ({"alerts": [{"when": "accuracy < high"}]}, r"'alerts\[0\].when' 'accuracy < high' is not an alert condition"),
    ({"alerts": [{"when": "acuracy < 0.8"}]}, r"'alerts\[0\].when' 'acuracy < 0.8': unknown metric 'acuracy'.*drift_<feature>"),
    ({"alerts": [{"when": "drift > 0.2", "do": ["page"]}]}, r"'alerts\[0\].do' has unknown action 'page'.*notify and/or retrain"),
    ({"alerts": [{"when": "drift > 0.2", "do": "retrian"}]}, r"unknown action 'retrian'"),
    ({"alerts": [{"when": "accuracy < 0.8", "min_labelled": -1}]}, r"'alerts\[0\].min_labelled' must be 0 or more, got -1"),
    ({"alerts": [{"when": "accuracy < 0.8", "window": "soon"}]}, r"'alerts\[0\].window' 'soon' is not a duration"),
    ({"alerts": [{"min_labelled": 3}]}, r"missing required key 'alerts\[0\].when'"),
    ({"alerts": [{"when": "drift > 0.2", "severity": "high"}]}, r"unknown key 'alerts\[0\].severity'.*do, min_labelled, when, window"),
    ({"capture": {"sample": 1.5}}, r"'capture.sample' must be a share between 0 and 1, got 1.5"),
    ({"capture": {"sample": -0.1}}, r"'capture.sample' must be a share between 0 and 1"),
    ({"capture": {"sample": "all"}}, r"'capture.sample' must be int or float, got 'all'"),
    ({"capture": {"max_age": "forever"}}, r"'capture.max_age' 'forever' is not a duration"),
    ({"notify": {"webhook": "ftp://hooks.example/x"}}, r"'notify.webhook' must be an http:// or https:// URL, got 'ftp://hooks.example/x'"),
    ({"notify": {"webhook": "hooks.example/ml"}}, r"'notify.webhook' must be an http:// or https:// URL"),
    ({"notify": {"repeat": "often"}}, r"'notify.repeat' 'often' is not a duration"),
    ({"notify": {"timeout": 0}}, r"'notify.timeout' must be a number of seconds above 0"),
    ({"monitor": {"endpoints": ["10.0.0.5:8080"]}}, r"'monitor.endpoints\[0\]' must be an http:// or https:// URL"),
    ({"monitor": {"window": "1 hour"}}, r"'monitor.window' '1 hour' is not a duration"),
    ({"monitor": {"schedule": "every 5 minutes"}}, r"'monitor.schedule'"),
    ({"monitor": {"source": "ftp://x/y.csv"}}, r"'monitor.source'.*unsupported data source"),
    ({"monitor": {"interval": "5m"}}, r"unknown key 'monitor.interval'.*endpoints, schedule, source, textfile, window"),
])
def test_monitoring_errors_name_file_key_and_fix(write_spec, overrides, message):
    with pytest.raises(SpecError, match=message):
        spec.load(write_spec(small_spec(**overrides)))


def test_drift_feature_must_be_a_listed_feature(write_spec):
    s = small_spec(alerts=[{"when": "drift_radius > 0.2"}])
    s["data"]["features"] = ["mean radius", "mean texture"]
    with pytest.raises(SpecError, match=r"names drift_radius, but 'radius' is not one of 'data.features'.*mean radius"):
        spec.load(write_spec(s))
    s["alerts"] = [{"when": "drift_mean radius > 0.2"}]
    assert spec.load(write_spec(s)).alerts[0]["metric"] == "drift_mean radius"
