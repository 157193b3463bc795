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
    with pytest.raises(SpecError, match=r"unknown key 'modle'.*expected one of: data, description, gate"):
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
