"""`mlpipe monitor`: a real registry on disk, a real SQLite capture database (mlpipe.capture.Store),
real HTTP receivers for the webhooks, a real `mlpipe serve` for /metrics, and real retrain processes."""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mlpipe import artifact, capture, monitor, spec as spec_mod, train
from mlpipe.registry import Registry
from conftest import Server, free_port

FEATURES = ["f0", "f1", "f2", "f3"]


def make_data(n: int, seed: int = 0) -> pd.DataFrame:
    from sklearn.datasets import make_classification
    X, y = make_classification(n_samples=n, n_features=4, n_informative=3, n_redundant=0, random_state=seed,
                               class_sep=1.5)
    df = pd.DataFrame(X, columns=FEATURES)
    df["label"] = y
    return df


# ---------------------------------------------------------------------------------------- webhooks
class Receiver:
    """An HTTP server in a thread: /ok answers 200, /flaky 500 twice then 200, /down always 503,
    /gone 404. Every request's path and JSON body is kept."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.flaky_failures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.requests.append((self.path, body))
                status = 200
                if self.path == "/flaky" and receiver.flaky_failures < 2:
                    receiver.flaky_failures += 1
                    status = 500
                elif self.path == "/down":
                    status = 503
                elif self.path == "/gone":
                    status = 404
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.requests if p == path]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


# ------------------------------------------------------------------------------------------ a model
class Model:
    """churn v1 in a registry under tmp, its spec file, and a capture database to write rows into."""

    def __init__(self, tmp: Path, name: str = "churn"):
        self.tmp, self.name = tmp, name
        self.pool = make_data(8000)
        self.csv = tmp / "data.csv"
        self.pool.iloc[:1500].to_csv(self.csv, index=False)
        self.registry = tmp / "registry"
        self.registry.mkdir()
        self.reg = Registry(str(self.registry))
        self.spec_path = tmp / "spec.yml"
        self.base = {"name": name, "data": {"source": f"csv:{self.csv}", "target": "label"},
                     "split": {"test_size": 0.25, "random_state": 3},
                     "model": {"estimator": "sklearn.tree.DecisionTreeClassifier",
                               "params": {"max_depth": 5, "random_state": 0}, "onnx": False},
                     "metrics": ["accuracy"], "gate": {"min": {"accuracy": 0.6}},
                     "retrain": {"min_new_rows": 1, "cooldown": "0s"}}
        self.spec = self.write_spec()
        self.register()
        self.est, _ = artifact.load_model(self.reg.pull(f"{name}:1", tmp / "pulled")[0])
        self.store = capture.Store(f"sqlite:///{tmp / 'capture.db'}")
        self.used = 1500

    def write_spec(self, **sections) -> spec_mod.Spec:
        self.spec_path.write_text(yaml.safe_dump({**self.base, **sections}))
        self.spec = spec_mod.load(self.spec_path)
        return self.spec

    def register(self, strip_baseline: bool = False) -> dict:
        with tempfile.TemporaryDirectory() as d:
            m = train.train(self.spec, Path(d), onnx=False)
            if strip_baseline:  # what a version registered before baselines looks like
                (Path(d) / "baseline.json").unlink()
                m = dict(m, files={k: v for k, v in m["files"].items() if k != "baseline.json"})
                m.pop("baseline")
                artifact.write_manifest(Path(d), m)
            return self.reg.register(Path(d))

    def capture(self, n: int, start: float, end: float, shift: float = 0.0, labels: str | None = "true",
                labelled: int | None = None, version: int = 1) -> None:
        """n captured predictions with timestamps spread over [start, end); f0 shifted by ``shift``;
        labels "true" (the real outcome), "wrong" (never what was predicted) or None; only the first
        ``labelled`` rows get a label."""
        rows = self.pool.iloc[self.used:self.used + n].reset_index(drop=True)
        self.used += n
        X = rows[FEATURES].copy()
        X["f0"] += shift
        pred = self.est.predict(X)
        ts = np.linspace(start, end, n, endpoint=False)
        ids = [uuid.uuid4().hex for _ in range(n)]
        self.store.write([{"request_id": ids[i], "row": 0, "model": self.name, "version": version, "host": "h1",
                           "ts": float(ts[i]), "latency_ms": 1.0, "inputs": X.iloc[i].to_dict(),
                           "prediction": int(pred[i])} for i in range(n)])
        if labels:
            truth = rows["label"].to_numpy() if labels == "true" else 1 - pred
            k = n if labelled is None else labelled
            self.store.attach_labels(self.name, [(ids[i], 0, int(truth[i])) for i in range(k)], "test")

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.reg.events(self.name) if e["event"] == kind]

    def run(self, now: float, **kw) -> dict:
        return monitor.run(self.spec, self.reg, self.store, now=now, log=lambda line: None, **kw)


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPIPE_LOG_DIR", str(tmp_path / "logs"))
    return Model(tmp_path)


def parse_textfile(path) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(Path(path).read_text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------------------------------------- tests
def test_healthy_model_is_quiet_and_writes_a_textfile(model, receiver, tmp_path):
    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 100}, {"when": "drift > 0.2"}],
                     notify={"webhook": receiver.url("/ok")})
    t = time.time()
    model.capture(600, t - 3000, t - 10)
    prom = tmp_path / "prom" / "mlpipe-{model}.prom"
    r = model.run(t, textfile=str(prom))
    assert r["exit_code"] == 0 and r["outcome"] == "healthy", r["summary"]
    w = r["windows"]["1h"]
    assert w["rows"] == 600 and w["labelled"] == 600 and w["values"]["accuracy"] > 0.85
    assert w["values"]["drift"] < 0.1 and set(w["drift"]) == set(FEATURES) | {"<prediction>"}
    assert w["drift"]["f0"]["test"] == "ks_2samp" and w["values"]["prediction_drift"] < 0.1
    assert [a["status"] for a in r["alerts"]] == ["ok", "ok"]
    assert re.match(r"churn v1: live accuracy 0\.\d\d on 600 labelled predictions ok \(alert < 0\.7\); drift: f\d PSI "
                    r"0\.\d\d ok \(alert > 0\.2\)\nall alerts quiet", r["summary"]), r["summary"]
    assert receiver.requests == [] and model.events("alert_firing") == []
    figures = parse_textfile(tmp_path / "prom" / "mlpipe-churn.prom")
    firing = {dict(k[1])["alert"]: v for k, v in figures.items() if k[0] == "mlpipe_monitor_alert_firing"}
    assert firing == {"accuracy < 0.7 [1h]": 0, "drift > 0.2 [1h]": 0}
    assert figures[("mlpipe_monitor_alert_threshold", (("alert", "drift > 0.2 [1h]"), ("metric", "drift"),
                                                        ("model", "churn"), ("op", ">")))] == 0.2
    assert figures[("mlpipe_monitor_value", (("metric", "accuracy"), ("model", "churn"), ("window", "1h")))] == \
        pytest.approx(w["values"]["accuracy"])
    assert figures[("mlpipe_monitor_labelled", (("model", "churn"), ("window", "1h")))] == 600
    assert figures[("mlpipe_monitor_last_run_timestamp_seconds", (("model", "churn"),))] == int(t)
    assert figures[("mlpipe_monitor_served_version", (("model", "churn"),))] == 1


def test_breach_notifies_once_per_repeat_then_resolves(model, receiver):
    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 100}, {"when": "drift > 0.2"}],
                     notify={"webhook": receiver.url("/flaky"), "repeat": "30m"})
    t = time.time()
    model.capture(400, t - 600, t - 1, shift=3.0, labels="wrong")
    r = model.run(t)
    assert r["exit_code"] == 14 and r["outcome"] == "firing"
    assert re.match(r"churn v1: live accuracy 0\.00 on 400 labelled predictions \(< 0\.7\) → ALERT; drift: f0 PSI "
                    r"\d+\.\d\d \(> 0\.2\) → ALERT\nnotified http://127\.0\.0\.1:\d+/flaky$", r["summary"]), r["summary"]
    # the first notice failed twice (HTTP 500) and got through on the third attempt
    assert [a["notified"]["attempts"] for a in r["alerts"]] == [3, 1]
    sent = receiver.bodies("/flaky")
    assert len(sent) == 4 and sent[0] == sent[2]
    first = sent[2]
    assert {k: first[k] for k in ("model", "version", "metric", "value", "threshold", "window", "status")} == \
        {"model": "churn", "version": 1, "metric": "accuracy", "value": 0.0, "threshold": 0.7, "window": "1h",
         "status": "firing"}
    assert first["alert"] == "churn v1: live accuracy 0.00 on 400 labelled predictions (< 0.7)" and first["at"]
    assert sent[3]["metric"] == "drift" and sent[3]["value"] > 0.2
    ev = model.events("alert_firing")
    assert len(ev) == 2 and ev[0]["metric"] == "accuracy" and ev[0]["notified"]["ok"] and not ev[0]["repeat"]

    # the same breach a minute later: no notice, still firing (exit 14)
    r = model.run(t + 60)
    assert r["exit_code"] == 14 and len(receiver.requests) == 4 and len(model.events("alert_firing")) == 2
    assert "still firing since" in r["summary"] and "next notice after" in r["summary"]
    assert all("notified" not in a for a in r["alerts"])

    # after notify.repeat: announced again, marked as a repeat
    r = model.run(t + 1900)
    assert r["exit_code"] == 14 and len(receiver.bodies("/flaky")) == 6
    assert [e["repeat"] for e in model.events("alert_firing")] == [False, False, True, True]

    # healthy traffic only in the window: both resolve, once
    model.capture(400, t + 4000, t + 5000)
    r = model.run(t + 5400)
    assert r["exit_code"] == 0 and [a["event"] for a in r["alerts"]] == ["resolved", "resolved"]
    resolved = receiver.bodies("/flaky")[6:]
    assert [b["status"] for b in resolved] == ["resolved", "resolved"]
    assert resolved[0]["alert"].startswith("churn v1: resolved — live accuracy 0.9") and "no longer < 0.7" in resolved[0]["alert"]
    assert len(model.events("alert_resolved")) == 2
    r = model.run(t + 5460)
    assert r["exit_code"] == 0 and len(receiver.requests) == 8


def test_min_labelled_and_unmeasured_alerts_do_not_fire(model, receiver):
    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 100}, {"when": "p99_ms > 50"}],
                     notify={"webhook": receiver.url("/ok")})
    t = time.time()
    model.capture(300, t - 600, t - 1, labels="wrong", labelled=40)
    r = model.run(t)
    assert r["exit_code"] == 0 and [a["status"] for a in r["alerts"]] == ["unknown", "unknown"]
    assert r["alerts"][0]["reason"] == "not enough labels (40 < 100)"
    assert "accuracy: not enough labels (40 < 100)" in r["summary"]
    assert "p99_ms: no endpoints" in r["summary"]
    assert r["windows"]["1h"]["values"]["accuracy"] == 0.0  # measured, but on too few labels to alert
    assert receiver.requests == [] and model.events("alert_firing") == []


def test_a_webhook_that_keeps_failing_is_logged_and_recorded(model, receiver):
    model.write_spec(alerts=["accuracy < 0.7", "drift > 0.2"], notify={"webhook": receiver.url("/down"), "retries": 2})
    t = time.time()
    model.capture(200, t - 600, t - 1, shift=3.0, labels="wrong")
    lines = []
    r = monitor.run(model.spec, model.reg, model.store, now=t, log=lines.append)
    assert r["exit_code"] == 14
    assert len(receiver.bodies("/down")) == 6  # 3 attempts for each of the two alerts
    n = r["alerts"][0]["notified"]
    assert n == {"ok": False, "attempts": 3, "error": "HTTP 503", "webhook": receiver.url("/down")}
    assert "webhook http://127.0.0.1:" in r["summary"] and "/down failed after 3 attempt(s): HTTP 503" in r["summary"]
    assert any(line.startswith("alert firing: churn v1: live accuracy 0.00") for line in lines)
    ev = model.events("alert_firing")
    assert len(ev) == 2 and ev[0]["notified"]["ok"] is False
    # a receiver that refuses the request (404) is not retried
    model.write_spec(alerts=["accuracy < 0.5"], notify={"webhook": receiver.url("/gone")})
    r = model.run(t + 10)
    assert r["alerts"][0]["notified"]["attempts"] == 1 and len(receiver.bodies("/gone")) == 1


def test_version_without_baseline_skips_drift_and_says_why(model):
    model.register(strip_baseline=True)  # v2: as registered before this release
    model.write_spec(alerts=["drift > 0.2", {"when": "accuracy < 0.7", "min_labelled": 10}])
    t = time.time()
    model.capture(200, t - 600, t - 1, shift=3.0, version=2)
    r = model.run(t)
    assert r["version"] == 2 and r["baseline"] is False and r["exit_code"] == 0
    assert r["alerts"][0]["status"] == "unknown"
    assert r["alerts"][0]["reason"].startswith("no baseline: v2 was registered before mlpipe kept baseline statistics")
    assert r["alerts"][1]["status"] == "ok"  # quality is still measured
    assert "note: no baseline: v2" in r["summary"]


def test_alert_retrain_runs_when_cooldown_allows_and_not_again(model, receiver):
    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 50, "do": ["notify", "retrain"]}],
                     notify={"webhook": receiver.url("/ok")})
    t = time.time()
    model.capture(200, t - 600, t - 1, labels="wrong")
    lines = []
    r = monitor.run(model.spec, model.reg, model.store, now=t, wait=True, log=lines.append)
    assert r["exit_code"] == 14
    rt = r["retrain"]
    assert rt["wait"] and rt["exit_code"] == 10, Path(rt["log"]).read_text()[-3000:]
    assert Path(rt["log"]).parent == model.tmp / "logs"
    assert "retrain churn: challenger v2" in Path(rt["log"]).read_text()
    assert any(line.startswith("  | ") and "retrain churn: challenger v2" in line for line in lines)
    assert re.search(r"notified http://127\.0\.0\.1:\d+/ok; retrain ran \(cooldown ok\), exit 10, log ", r["summary"])
    started = model.events("monitor_retrain_started")
    assert len(started) == 1 and started[0]["exit_code"] == 10 and started[0]["alert"] == "accuracy < 0.7"
    assert model.reg.versions("churn") == [1, 2] and len(model.events("retrain_promoted")) == 1
    # v2 is production now, and nothing it predicted has a label yet: the alert stays as it was (firing),
    # nothing is announced or started
    r = model.run(t + 60)
    assert r["version"] == 2 and r["alerts"][0]["status"] == "unknown" and r["exit_code"] == 14
    assert r["summary"].startswith("churn v2: accuracy: not enough labels (0 < 50) (firing since ")
    assert "retrain" not in r and len(receiver.requests) == 1
    # v2 wrong as well: the alert started a retrain a moment ago, so not again before notify.repeat
    model.capture(200, t - 300, t - 1, labels="wrong", version=2)
    r = model.run(t + 120)
    assert r["alerts"][0]["status"] == "firing" and "retrain" not in r
    assert "retrain not started: this alert started one at" in r["summary"]
    assert len(model.events("monitor_retrain_started")) == 1


def test_retrain_is_blocked_by_cooldown_pause_and_a_running_retrain(model, tmp_path):
    from mlpipe import retrain as rt
    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 50, "do": ["retrain"]}],
                     retrain={"cooldown": "6h", "min_new_rows": 1})
    model.reg.record("churn", "retrain_promoted", version=1, trained=True, reason="earlier run")
    t = time.time()
    model.capture(200, t - 600, t - 1, labels="wrong")
    r = model.run(t)
    assert r["exit_code"] == 14 and "retrain" not in r
    assert re.search(r"retrain not started: cooldown — last retrain \d+s ago \(v1, promoted\), needs 6h00m", r["summary"])
    assert model.events("monitor_retrain_started") == [] and not (tmp_path / "logs").exists()
    assert len(model.events("alert_firing")) == 1  # without notify in do: still a log line and a ledger event

    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 50, "do": ["retrain"]}])
    rt.pause(model.reg, "churn", "labels are being fixed")
    r = model.run(t + 60)
    assert "retrain not started: retraining is paused by" in r["summary"] and "labels are being fixed" in r["summary"]
    rt.resume(model.reg, "churn")
    model.reg.store.put("churn/retrain/LOCK", json.dumps({"run": "x", "host": socket.gethostname(), "pid": os.getpid(),
                                                          "since": "2030-01-01T00:00:00Z"}).encode())
    r = model.run(t + 120)
    assert f"retrain not started: a retrain is running (pid {os.getpid()} on {socket.gethostname()}" in r["summary"]
    assert model.events("monitor_retrain_started") == []


def test_detached_retrain_appends_to_its_log(model):
    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 50, "do": ["retrain"]}])
    t = time.time()
    model.capture(200, t - 600, t - 1, labels="wrong")
    r = model.run(t)
    rt = r["retrain"]
    assert not rt["wait"] and "exit_code" not in rt and rt["log"] == str(model.tmp / "logs" / "retrain-churn.log")
    assert f"retrain started (cooldown ok), log {rt['log']}" in r["summary"]
    assert model.events("monitor_retrain_started")[0]["pid"] == rt["pid"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not model.events("retrain_promoted"):
        time.sleep(0.5)
    text = Path(rt["log"]).read_text()
    assert text.startswith("--- ") and "mlpipe monitor: alert 'accuracy < 0.7' firing" in text
    assert model.events("retrain_promoted"), text


def test_serving_figures_and_source_quality_from_a_live_server(model, tmp_path):
    import requests

    from mlpipe import hostdir
    d = tmp_path / "models" / "churn"
    model.reg.pull("churn:1", d)
    hostdir.activate(d, 1)
    holdout = tmp_path / "labelled.csv"
    model.pool.iloc[6000:6300].to_csv(holdout, index=False)
    server = Server(d, tmp_path, env={"MLPIPE_CAPTURE_SAMPLE": "0", "MLPIPE_CAPTURE_DB": f"sqlite:///{tmp_path}/srv.db"},
                    workers=1)
    try:
        X = model.pool.iloc[7000:7020][FEATURES]
        for i in range(20):
            body = {"dataframe_split": {"columns": FEATURES, "data": X.iloc[i:i + 1].values.tolist()}}
            assert requests.post(f"{server.url}/invocations", json=body, timeout=10).status_code == 200
        assert requests.post(f"{server.url}/invocations", json={"nonsense": 1}, timeout=10).status_code == 400
        down = f"http://127.0.0.1:{free_port()}"
        model.write_spec(alerts=["p99_ms > 0", "error_rate > 0.5", {"when": "accuracy < 0.7", "min_labelled": 100}],
                         monitor={"endpoints": [server.url, down], "source": f"csv:{holdout}"})
        prom = tmp_path / "m.prom"
        r = model.run(time.time(), textfile=str(prom))
        assert r["version_from"] == "served by 1 of 2 endpoint(s)" and r["version"] == 1
        e = r["endpoints"][server.url]
        assert e["up"] and e["since"] == "server start" and e["requests"] == 21 and e["errors"] == 0
        w = r["windows"]["1h"]
        assert w["values"]["p99_ms"] > 0 and w["values"]["error_rate"] == 0
        assert r["source"]["rows"] == 300 and w["labelled"] == 300 and w["values"]["accuracy"] > 0.85
        assert w["quality_on"].endswith(f"through {server.url}")
        assert [a["status"] for a in r["alerts"]] == ["firing", "ok", "ok"] and r["exit_code"] == 14
        assert re.search(r"p99 \d+\.\d ms \(> 0\) → ALERT; error rate 0\.00% ok \(alert > 0\.5\)", r["summary"])
        assert any(n.startswith(f"{down} unreachable") for n in r["notes"])
        figures = parse_textfile(prom)
        assert figures[("mlpipe_monitor_endpoint_up", (("endpoint", down), ("model", "churn")))] == 0
        assert figures[("mlpipe_monitor_endpoint_up", (("endpoint", server.url), ("model", "churn")))] == 1
        # the next run counts only what came since: the two batches that scored the source
        r = model.run(time.time())
        e = r["endpoints"][server.url]
        assert e["since"] == "previous run" and e["requests"] == 2
    finally:
        server.stop()


def test_cli(model, receiver, tmp_path):
    from click.testing import CliRunner

    from mlpipe.cli_monitor import monitor as command
    model.write_spec(alerts=["drift > 0.2"], notify={"webhook": receiver.url("/ok")})
    t = time.time()
    model.capture(200, t - 600, t - 1)
    args = [str(model.spec_path), "--db", f"sqlite:///{model.tmp / 'capture.db'}", "--registry", str(model.registry)]
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 0, res.output
    assert re.search(r"churn v1: drift: f\d PSI 0\.\d\d ok \(alert > 0\.2\)", res.output)
    model.capture(200, t - 300, t - 1, shift=4.0)
    prom = tmp_path / "cli.prom"
    res = CliRunner().invoke(command, args + ["--json", "--textfile", str(prom)])
    assert res.exit_code == 14, res.output
    report = json.loads(res.stdout)  # log lines went to stderr
    assert report["outcome"] == "firing" and report["alerts"][0]["status"] == "firing"
    assert report["textfile"] == str(prom) and prom.is_file()
    assert receiver.bodies("/ok")[0]["metric"] == "drift"
    res = CliRunner().invoke(command, ["--help"])
    assert res.exit_code == 0 and "Example:" in res.output and "14 an alert is firing" in res.output


def test_histogram_quantile_delta_and_redaction():
    b = {"0.005": 0.0, "0.01": 50.0, "0.025": 99.0, "0.05": 100.0, "+Inf": 100.0}
    assert monitor.histogram_quantile(0.99, b) == pytest.approx(0.025)
    assert monitor.histogram_quantile(0.5, b) == pytest.approx(0.01)
    assert monitor.histogram_quantile(0.99, {"0.01": 10.0, "+Inf": 100.0}) == 0.01  # beyond the last bound
    assert monitor.histogram_quantile(0.99, {"0.01": 0.0, "+Inf": 0.0}) is None
    before = {"buckets": {"0.01": 10.0, "+Inf": 12.0}, "requests": 12.0, "errors": 1.0}
    now = {"buckets": {"0.01": 15.0, "+Inf": 20.0}, "requests": 20.0, "errors": 1.0}
    assert monitor.delta(now, before) == ({"buckets": {"0.01": 5.0, "+Inf": 8.0}, "requests": 8.0, "errors": 0.0}, True)
    restarted = {"buckets": {"0.01": 3.0, "+Inf": 3.0}, "requests": 3.0, "errors": 0.0}
    assert monitor.delta(restarted, before) == (restarted, False)
    assert monitor.redact_url("https://hooks.slack.com/services/T0/B0/SECRET?x=1") == "https://hooks.slack.com/services/…"
    assert monitor.redact_url("https://user:pw@hooks.example:8443/ml") == "https://hooks.example:8443/ml"


# ------------------------------------------------------------------------------------ failure paths
class Trickle:
    """A webhook that accepts the request and then sends one header byte every second, for ever:
    every socket read succeeds, so requests' own timeout never fires."""

    def __init__(self):
        import socket as so
        self.sock = so.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow"

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        try:
            conn.recv(65536)
            for ch in b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 10000:
                if self.stop.is_set():
                    return
                conn.send(bytes([ch]))
                time.sleep(1)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def test_a_webhook_that_trickles_cannot_hold_the_run(model):
    hook = Trickle()
    try:
        model.write_spec(alerts=["accuracy < 0.7"], notify={"webhook": hook.url, "timeout": 2, "retries": 1})
        t = time.time()
        model.capture(200, t - 600, t - 1, labels="wrong")
        t0 = time.monotonic()
        r = model.run(t)
        took = time.monotonic() - t0
    finally:
        hook.close()
    notified = r["alerts"][0]["notified"]
    assert not notified["ok"] and "no complete answer within 2 s" in notified["error"], notified
    assert r["exit_code"] == 14 and took < monitor.NOTIFY_MAX_SECONDS  # bounded, not for ever


def test_a_log_folder_it_cannot_write_does_not_stop_the_run_or_renotify(model, receiver, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("MLPIPE_LOG_DIR", str(tmp_path / "afile" / "logs"))
    model.write_spec(alerts=[{"when": "accuracy < 0.7", "min_labelled": 50, "do": ["notify", "retrain"]}],
                     notify={"webhook": receiver.url("/ok")})
    t = time.time()
    model.capture(200, t - 600, t - 1, labels="wrong")
    r = model.run(t)
    assert r["exit_code"] == 14 and "retrain" not in r
    assert "retrain not started: cannot write its log" in r["summary"] and "MLPIPE_LOG_DIR" in r["summary"]
    assert model.events("monitor_retrain_started") == []
    r = model.run(t + 60)  # the state was kept: the same breach is not announced again
    assert len(receiver.requests) == 1


def test_an_unwritable_textfile_is_a_note_not_a_crash(model, tmp_path):
    (tmp_path / "afile").write_text("x")
    model.write_spec(alerts=["accuracy < 0.7"], monitor={"textfile": str(tmp_path / "afile" / "m.prom")})
    r = model.run(time.time())
    assert r["exit_code"] == 0 and any("could not write the Prometheus textfile" in n for n in r["notes"])


def test_two_monitors_of_one_model_do_not_run_at_once(model):
    from mlpipe.errors import Locked
    model.write_spec(alerts=["accuracy < 0.7"])
    model.reg.store.put("churn/monitor/LOCK", json.dumps({"run": "other", "host": "trainer-2", "pid": 1,
                                                          "since": time.time()}).encode())
    with pytest.raises(Locked, match="another mlpipe monitor of churn is running .* on trainer-2"):
        model.run(time.time())
    # a lock left by a run that died long ago is taken over, and released at the end
    model.reg.store.put("churn/monitor/LOCK", json.dumps({"run": "old", "host": "trainer-2", "pid": 1,
                                                          "since": time.time() - 7200}).encode(), )
    assert model.run(time.time())["exit_code"] == 0
    with pytest.raises(KeyError):
        model.reg.store.get_json("churn/monitor/LOCK")


def test_a_capture_database_that_does_not_exist_is_named(model, tmp_path):
    model.write_spec(alerts=["drift > 0.2"])
    store = capture.Store(f"sqlite:///{tmp_path}/nowhere/capture.db")
    r = monitor.run(model.spec, model.reg, store, now=time.time(), log=lambda line: None)
    assert any(f"no capture database at {tmp_path}/nowhere/capture.db" in n for n in r["notes"]), r["notes"]
    assert not (tmp_path / "nowhere").exists()
