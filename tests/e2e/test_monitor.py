"""Prediction capture, feedback labels and the self-healing loop, end to end on the local fleet, with
a real PostgreSQL (a child process of this test, run as the postgres user) as the capture database:

a. site.yml points every server at PostgreSQL; v1 (trained on the original data) is deployed; the
   spec says ``capture.sample: 1`` and the servers take it from the version they serve.
b. steady traffic whose inputs drift (the size features grow by half) and whose true outcomes have
   turned (the labels flipped), every answer with a request id; the labels are fed back, half with
   ``mlpipe feedback load`` (a CSV), half with ``POST /feedback`` through the balancer.
c. ``mlpipe monitor`` sees live accuracy below the alert and the drift, notifies a real HTTP receiver
   started here, and starts ``mlpipe retrain --force``: the challenger learns from the fed-back labels
   (the spec's source is ``predictions:credit-risk?labelled=true``) and goes live on every host, with
   no failed request under a steady load. A second monitor run does not re-alert.
d. PostgreSQL stopped: predictions keep answering (none fails), the lost rows are counted in /metrics;
   started again: capture resumes.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from e2e.fleet import ALL, ROOT, Load, holdout, on

pytestmark = pytest.mark.e2e

MODEL = "credit-risk"
STATE: dict = {}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pg():
    from postgres import postgres_server
    with postgres_server(db="capture") as server:
        yield server


class Receiver:
    """The team's alert webhook: a real HTTP server that keeps every JSON body it is sent."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/ml"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def firing(self) -> list[dict]:
        return [r for r in self.received if r.get("status") == "firing"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


# ------------------------------------------------------------------------------------- helpers
def original():
    from sklearn.datasets import load_breast_cancer
    return load_breast_cancer(as_frame=True).frame


def drifted(n: int, seed: int):
    """Rows from a world that changed: the size features are half as large again, and the outcome
    the old model learned has turned (flipped labels)."""
    frame = original().sample(n, replace=True, random_state=seed).reset_index(drop=True)
    for c in frame.columns:
        if any(k in c for k in ("radius", "perimeter", "area")):
            frame[c] = frame[c] * 1.5
    frame["target"] = 1 - frame["target"]
    return frame


def send(url: str, frame, threads: int = 3) -> list[tuple[str, int, int]]:
    """One row per request through the balancer: [(request id, true label, answered version)]."""
    import requests
    cols = [c for c in frame.columns if c != "target"]
    local = threading.local()

    def one(i):
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        row = frame.iloc[i]
        r = s.post(f"{url}/invocations", json={"dataframe_split": {"columns": cols, "data": [row[cols].tolist()]}},
                   timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["X-Request-Id"] == r.json()["request_id"]
        return r.json()["request_id"], int(row["target"]), int(r.json()["model_version"])
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(frame))))


def monitor(fleet, pg, *args: str) -> subprocess.CompletedProcess:
    env = {**fleet.env, "MLPIPE_CAPTURE_DB": pg.url, "MLPIPE_DEPLOY_PROJECT": str(ROOT),
           "MLPIPE_LOG_DIR": str(fleet.tmp / "monitor-logs")}
    r = subprocess.run([sys.executable, "-m", "mlpipe", "monitor", str(STATE["spec"]), "--registry",
                        str(fleet.registry), *args], capture_output=True, text=True, env=env, timeout=600)
    (fleet.tmp / "monitor.log").open("a").write(f"\n===== monitor {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# --------------------------------------------------------------------------------------- tests
def test_a_servers_capture_into_postgresql(fleet, pg, receiver):
    import yaml
    from mlpipe import capture
    data_dir = fleet.root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    original().to_csv(data_dir / "original.csv", index=False)
    spec = {"name": MODEL, "description": "credit-risk that heals itself from fed-back labels",
            "data": {"source": f"predictions:{MODEL}?labelled=true&since=30d&target=target", "target": "target"},
            "split": {"test_size": 0.25, "random_state": 7, "stratify": True},
            "model": {"estimator": "sklearn.tree.DecisionTreeClassifier", "params": {"max_depth": 4, "random_state": 0}},
            "metrics": ["accuracy"],
            "gate": {"min": {"accuracy": 0.8}},
            "retrain": {"cooldown": "1h", "promote": "production", "deploy": True},
            "capture": {"sample": 1.0},
            "alerts": [{"when": "accuracy < 0.80", "min_labelled": 100, "do": ["notify", "retrain"]},
                       {"when": "drift > 0.2", "do": ["notify"]}],
            "notify": {"webhook": receiver.url, "repeat": "1h"},
            "monitor": {"window": "1h", "endpoints": [fleet.host_url(h) for h in ALL]}}
    spec_path = fleet.root / "credit-risk.yml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    STATE["spec"] = spec_path

    r = fleet.playbook("site.yml", "-e", f"model_server_capture_db={pg.url}")
    assert r.returncode == 0, r.stdout[-4000:]
    # v1 from the original data (the spec's own source has no labelled predictions yet)
    r = fleet.mlpipe("train", str(spec_path), "--data", f"csv:{data_dir / 'original.csv'}", "-m", "v1", "--json")
    assert r.returncode == 0, r.stderr
    assert fleet.deploy(1, *holdout(fleet)).returncode == 0
    assert fleet.versions() == on(fleet, 1)

    answered = send(fleet.lb_url, original().sample(30, random_state=1))
    store = capture.Store(pg.url)
    ids = {rid for rid, _, _ in answered}
    fleet.wait_for(lambda: ids <= set(store.predictions(MODEL).request_id), timeout=60)  # every one: sample 1
    got = store.predictions(MODEL)
    assert len(got) == 30, len(got)  # and nothing else: the deploy's checks are not captured
    assert set(got.host) == set(ALL), set(got.host)  # each server names itself (its inventory name)
    assert set(got.version) == {1}


def test_b_drifting_traffic_and_labels_fed_back(fleet, pg):
    import requests
    answered = send(fleet.lb_url, drifted(400, seed=3))
    assert {v for _, _, v in answered} == {1}
    half = len(answered) // 2
    labels = fleet.tmp / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request_id", "label"])
        w.writerows((rid, label) for rid, label, _ in answered[:half])
    env = {**fleet.env, "MLPIPE_CAPTURE_DB": pg.url}
    r = subprocess.run([sys.executable, "-m", "mlpipe", "feedback", "load", MODEL, str(labels)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"stored {half} labels", r.stdout), r.stdout
    # the other half through the servers' POST /feedback (any host behind the balancer)
    for i in range(half, len(answered), 50):
        batch = [{"request_id": rid, "label": label} for rid, label, _ in answered[i:i + 50]]
        resp = requests.post(f"{fleet.lb_url}/feedback", json=batch, timeout=30)
        assert resp.status_code == 200 and resp.json()["stored"] == len(batch), resp.text
    from mlpipe import capture
    store = capture.Store(pg.url)
    # the servers write captured rows in the background (paced to a share of a core): a label can arrive
    # before its prediction is written, and joins it when it is
    fleet.wait_for(lambda: len(store.predictions(MODEL, labelled=True)) >= 400, timeout=120, every=1)
    labelled = store.predictions(MODEL, labelled=True)
    assert (labelled.prediction.astype(int) == labelled.label.astype(int)).mean() < 0.8  # v1 is wrong now


def test_c_monitor_alerts_and_the_retrain_heals_the_fleet(fleet, pg, receiver):
    with Load(fleet.lb_url, fleet.body) as load:
        r = monitor(fleet, pg)
        assert r.returncode == 14, r.stdout + r.stderr
        out = r.stdout
        assert re.search(r"credit-risk v1: live accuracy 0\.\d+ on \d+ labelled predictions", out), out
        assert "ALERT" in out and re.search(r"drift: .*PSI", out), out
        assert "retrain started" in out, out
        firing = receiver.firing()
        metrics = {f["metric"] for f in firing}
        assert {"accuracy", "drift"} <= metrics, receiver.received
        acc = next(f for f in firing if f["metric"] == "accuracy")
        assert acc["model"] == MODEL and acc["version"] == 1 and acc["value"] < 0.8 and acc["threshold"] == 0.8
        assert acc["window"]
        # a second run while the breach goes on: no second notice
        r2 = monitor(fleet, pg)
        assert r2.returncode == 14, r2.stdout + r2.stderr
        assert len(receiver.firing()) == len(firing), receiver.received
        # the retrain the monitor started learns from the fed-back labels and deploys v2 everywhere
        fleet.wait_for(lambda: fleet.versions() == on(fleet, 2), timeout=480, every=2)
        # the retrain records its outcome once the deploy has finished
        promoted = fleet.wait_for(lambda: [e for e in fleet.events(MODEL) if e["event"] == "retrain_promoted"],
                                  timeout=240, every=1)
    assert not load.failures, (load.counts, load.failures[:5])
    assert promoted[-1]["version"] == 2 and promoted[-1]["deploy"]["rc"] == 0, promoted
    manifest = json.loads(fleet.mlpipe("models", "show", f"{MODEL}:2", "--json").stdout)
    assert manifest["data"]["source"].startswith(f"predictions:{MODEL}"), manifest["data"]
    kinds = [e["event"] for e in fleet.events(MODEL)]
    assert "alert_firing" in kinds and "monitor_retrain_started" in kinds, kinds
    # v2 answers the changed world well
    answered = send(fleet.lb_url, drifted(100, seed=4))
    assert {v for _, _, v in answered} == {2}


def test_d_a_stopped_database_costs_captured_rows_not_predictions(fleet, pg):
    import requests

    def dropped() -> float:
        return sum(metric_sum(requests.get(f"{fleet.host_url(h)}/metrics", timeout=10).text,
                              "mlpipe_capture_dropped_rows_total") for h in ALL)
    before = dropped()
    pg.stop()
    try:
        t0 = time.monotonic()
        with Load(fleet.lb_url, fleet.body, threads=3) as load:
            time.sleep(15)
        down_seconds = time.monotonic() - t0
        assert not load.failures, (load.counts, load.failures[:5])
        answered = sum(load.counts.values())
        assert answered > 50, load.counts
        fleet.wait_for(lambda: dropped() > before, timeout=60, every=1)
        print(f"database down: {answered} predictions in {down_seconds:.1f} s, none failed")
    finally:
        pg.start()
    from mlpipe import capture
    store = capture.Store(pg.url)
    n = store.count(MODEL)

    def resumed() -> bool:  # each worker retries the database after its backoff (at most 30 s)
        send(fleet.lb_url, original().sample(20, random_state=9))
        return store.count(MODEL) >= n + 20
    fleet.wait_for(resumed, timeout=180, every=2)  # capture resumed
