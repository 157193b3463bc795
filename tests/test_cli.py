"""The CLI as a user meets it: real processes, one-line errors, exit codes, --json everywhere."""
import json

import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from conftest import EXAMPLES, free_port, run_cli


def _commands(group, prefix=()):
    import click
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        yield prefix + (name,), cmd


@pytest.mark.parametrize("path,cmd", list(_commands(cli)), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_command_has_help_with_example(path, cmd):
    r = CliRunner().invoke(cli, [*path, "--help"])
    assert r.exit_code == 0
    assert "Example:" in r.output, f"{' '.join(path)} --help has no example"


def test_python_dash_m():
    r = run_cli("--version")
    assert r.returncode == 0 and "mlpipe" in r.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    reg = tmp_path_factory.mktemp("cli") / "reg"
    for spec in ("credit-risk", "hello-world"):
        r = run_cli("train", EXAMPLES / f"{spec}.yml", "-m", f"{spec} first", "--registry", reg)
        assert r.returncode == 0, r.stderr
    r = run_cli("train", EXAMPLES / "credit-risk.yml", "-m", "Updated model with August data", "--registry", reg)
    assert r.returncode == 0, r.stderr
    return reg


def test_list_log_show_promote(trained):
    env = {"MLPIPE_REGISTRY": str(trained)}
    assert run_cli("models", "promote", "credit-risk:2", "--alias", "production", "--reason", "beats v1", env=env).returncode == 0
    out = run_cli("models", "list", env=env).stdout.splitlines()
    assert out[0].split() == ["credit-risk", "v2", "production"] and out[1].split() == ["hello-world", "v1"]
    log = run_cli("models", "log", env=env).stdout
    assert log.startswith("Model-ID: ") and "Model-Name: credit-risk\nModel-Version: 2\nDate: " in log
    assert "    Updated model with August data" in log
    show = run_cli("models", "show", "credit-risk@production", env=env).stdout
    for line in ("Model-Name: credit-risk", "Model-Version: 2", "Algo: DecisionTreeClassifier",
                 "Parameters: max_depth=4;random_state=12345;criterion=gini", "Aliases: production"):
        assert line in show
    assert "Accuracy: 0." in show and "Content-Encoding: joblib" in show
    j = json.loads(run_cli("models", "show", "credit-risk", "--json", env=env).stdout)
    assert j["version"] == 2 and j["aliases"] == ["production"]
    hist = run_cli("models", "history", "credit-risk", "--json", env=env)
    assert [e["event"] for e in json.loads(hist.stdout)][-1] == "promoted"


def test_pull_activate(trained, tmp_path):
    r = run_cli("models", "pull", "credit-risk:1", "--dest", tmp_path / "srv", "--activate", "--json", "--registry", trained)
    assert json.loads(r.stdout)["changed"] is True
    r = run_cli("models", "pull", "credit-risk:1", "--dest", tmp_path / "srv", "--activate", "--json", "--registry", trained)
    assert json.loads(r.stdout)["changed"] is False
    assert (tmp_path / "srv" / "current").resolve().name == "1"


def test_evaluate_exit_codes(trained, tmp_path):
    env = {"MLPIPE_REGISTRY": str(trained)}
    assert run_cli("evaluate", "credit-risk:2", "--min", "accuracy=0.8", env=env).returncode == 0
    r = run_cli("evaluate", "credit-risk:2", "--min", "accuracy=0.999", env=env)
    assert r.returncode == 1 and "FAIL accuracy" in r.stdout
    r = run_cli("evaluate", "credit-risk:2", "--min", "accuracy", env=env)
    assert r.returncode == 3 and "METRIC=NUMBER" in r.stderr
    # a holdout file that a user brings
    from mlpipe import data
    data.load("sklearn:breast_cancer").frame.sample(100, random_state=1).to_csv(tmp_path / "holdout.csv", index=False)
    r = run_cli("evaluate", "credit-risk:2", "--data", f"csv:{tmp_path / 'holdout.csv'}", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["data"]["rows"] == 100


@pytest.mark.parametrize("args,code,message", [
    (("models", "show", "nope"), 5, "unknown model 'nope'"),
    (("models", "show", "credit-risk:99"), 5, "no version 99"),
    (("models", "show", "credit-risk@staging"), 5, "no alias 'staging'"),
    (("models", "show", "Bad Ref"), 3, "is not a model reference"),
    (("models", "promote", "credit-risk:1"), 3, "Missing option '--alias'"),
    (("train", "missing.yml"), 3, "pipeline spec missing.yml not found"),
    (("frobnicate",), 3, "No such command"),
])
def test_errors_are_one_line_with_exit_codes(trained, args, code, message):
    r = run_cli(*args, "--registry", trained) if args[0] != "frobnicate" else run_cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content,message", [
    ("name: x\n  data: [\n", "malformed YAML"),
    ("name: x\ndata: {source: sklearn:iris, target: target}\nmodel: {estimator: sklearn.nope.Model}\n", "unknown estimator"),
    ("name: x\ndata: {source: sklearn:iris, target: target}\nmodel: {estimator: sklearn.svm.SVC}\nmetrics: [acc]\n", "unknown metric 'acc'"),
    ("name: x\ndata: {source: sklearn:iris, target: label}\nmodel: {estimator: sklearn.svm.SVC}\n", "target column 'label' not in"),
    ("name: x\ndata: {source: sklearn:iris, target: target}\nmodel: {estimator: sklearn.svm.SVC}\nextra: 1\n", "unknown key 'extra'"),
])
def test_bad_specs_via_cli(tmp_path, content, message):
    p = tmp_path / "s.yml"
    p.write_text(content)
    r = run_cli("train", p, "--registry", tmp_path / "reg")
    assert r.returncode in (3, 4) and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "reg").exists() or not any((tmp_path / "reg").rglob("manifest.json"))


def test_tampered_artifact_via_cli(trained, tmp_path):
    import shutil
    reg = tmp_path / "reg"
    shutil.copytree(trained, reg)
    with open(reg / "hello-world" / "versions" / "1" / "model.joblib", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    r = run_cli("models", "pull", "hello-world:1", "--dest", tmp_path / "srv", "--registry", reg)
    assert r.returncode == 6 and "does not match its manifest" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("evaluate", "hello-world:1", "--registry", reg)
    assert r.returncode == 6


def test_unreachable_s3_via_cli():
    r = run_cli("models", "list", "--registry", "s3://bucket/p", env={"MLPIPE_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 7 and "cannot reach S3" in r.stderr and "Traceback" not in r.stderr
    assert "testing" not in r.stderr  # no credentials in messages
