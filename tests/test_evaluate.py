"""mlpipe evaluate: offline on a registered version, and live against a running server."""
import json

import pytest

from mlpipe import hostdir
from mlpipe.registry import Registry
from conftest import EXAMPLES, Server, free_port, run_cli


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
    yield {"url": server.url, "reg": reg, "holdout": f"csv:{tmp / 'holdout.csv'}"}
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
    assert r.returncode == 2 and "expected 'other'" in r.stderr
    r = run_cli("evaluate", "--endpoint", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (("--endpoint", "localhost:8000"), "not an http(s) URL"),
    (("--endpoint", "http://x", "--min", "accuracy=0.9"), "metric thresholds need --data"),
    (("credit-risk:1", "--endpoint", "http://x"), "not both"),
    (("credit-risk:1", "--expect-version", "2"), "need --endpoint"),
    ((), "needs a model reference or --endpoint"),
])
def test_usage_errors_exit_3(args, message):
    r = run_cli("evaluate", *args)
    assert r.returncode == 3 and message in r.stderr, r.stderr
