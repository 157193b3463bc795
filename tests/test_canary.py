"""mlpipe.canary: the bake against real HTTP servers that serve Prometheus text with the metric names
the model servers use (made by prometheus_client, the library the servers use), traffic added between
scrapes; HAProxy runtime weights against a real haproxy child process."""
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mlpipe import canary
from mlpipe.errors import UsageError
from mlpipe.serve.prometheus import LATENCY_BUCKETS, VALUE_BUCKETS
from conftest import free_port, haproxy_backend, run_cli, stop, wait_port


class Host:
    """A server whose /metrics says what it was told it answered."""

    def __init__(self, version="1"):
        self.version = version
        self.down = False
        self._reset()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if host.down or self.path != "/metrics":
                    self.send_response(503 if host.down else 404)
                    self.end_headers()
                    return
                body = generate_latest(host.registry)
                host.auth.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.auth: list = []
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _reset(self):
        """A fresh registry: what a restarted server shows (every counter from zero)."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mlpipe_requests", "", ["endpoint", "status"], registry=r)
        self.latency = Histogram("mlpipe_request_seconds", "", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.rows = Counter("mlpipe_predicted_rows", "", ["version"], registry=r)
        self.classes = Counter("mlpipe_predictions", "", ["version", "label"], registry=r)
        self.values = Histogram("mlpipe_prediction_value", "", ["version"], buckets=VALUE_BUCKETS, registry=r)
        self.info = Gauge("mlpipe_model_info", "", ["name", "version", "id", "runtime"], registry=r)
        self.info.labels("credit-risk", self.version, "x", "sklearn").set(1)
        # what is not a prediction: must not count
        self.requests.labels("/metadata", "200").inc(1000)
        self.latency.labels("/metadata").observe(3.0)

    def restart(self):
        self._reset()

    def serve(self, n, status=200, seconds=0.004, label="0", value=None, endpoint="/invocations"):
        for _ in range(n):
            self.requests.labels(endpoint, str(status)).inc()
            self.latency.labels(endpoint).observe(seconds)
            if status == 200:
                self.rows.labels(self.version).inc()
                if value is None:
                    self.classes.labels(self.version, label).inc()
                else:
                    self.values.labels(self.version).observe(value)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hosts():
    made = []

    def make(version="1"):
        h = Host(version)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


class Traffic:
    """The bake's clock and sleep: every sleep is time passing with traffic, added by ``step``."""

    def __init__(self, step):
        self.now, self.step, self.sleeps = 0.0, step, 0

    def clock(self):
        return self.now

    def sleep(self, s):
        self.now += s
        self.sleeps += 1
        if s > 0:
            self.step(s)


def run(canaries, olds, seconds=30, step=lambda s: None, **kw):
    t = Traffic(step)
    report = canary.bake([f"c{i}={h.url}" for i, h in enumerate(canaries, 1)],
                         [f"o{i}={h.url}" for i, h in enumerate(olds, 1)], seconds, clock=t.clock, sleep=t.sleep,
                         interval=5, **kw)
    return report, t


def check(report, name):
    return next(c for c in report["checks"] if c["check"] == name)


def test_scrape_reads_prediction_routes_only(hosts):
    h = hosts()
    h.serve(10)
    h.serve(2, status=500)
    h.serve(3, status=400, endpoint="/v2/models/<name>/infer")
    h.serve(4, label="1", endpoint="/models/<name>/invocations")   # a multi-model route counts as well
    s = canary.scrape(h.url, token="t0k")
    assert s["requests"] == 19 and s["by_class"] == {"2xx": 14, "5xx": 2, "4xx": 3}
    assert s["classes"] == {"0": 10, "1": 4} and s["rows"] == 14 and s["versions"] == ["1"]
    assert s["buckets"]["+Inf"] == 19  # /metadata's observation is not in it
    assert h.auth == ["Bearer t0k"]


def test_a_canary_like_the_old_hosts_passes_with_both_sides_figures(hosts):
    c, o1, o2 = hosts("2"), hosts(), hosts()

    def step(s):
        c.serve(10)
        c.serve(2, label="1")
        for o in (o1, o2):
            o.serve(45)
            o.serve(9, label="1")
    report, t = run([c], [o1, o2], seconds=30, step=step, expect_version=2)
    assert report["passed"] and report["verdict"] == "pass" and report["breached"] == []
    assert report["canary"]["requests"] == 72 and report["old"]["requests"] == 648
    assert report["canary"]["error_rate"] == 0 and report["old"]["error_rate"] == 0
    assert report["canary_hosts"] == ["c1"] and report["old_hosts"] == ["o1", "o2"]
    assert check(report, "prediction_shift")["value"] == pytest.approx(0.0, abs=1e-9)
    assert 1 < report["canary"]["p99_ms"] <= 5 and report["seconds"] == 30 and report["complete"]
    assert "n/a" not in canary.describe(report)


def test_errors_on_live_traffic_stop_the_bake_early(hosts):
    c, o = hosts("2"), hosts()

    def step(s):
        c.serve(40)
        c.serve(10, status=500)
        o.serve(200)
    report, t = run([c], [o], seconds=300, step=step, expect_version="2")
    assert not report["passed"] and report["breached"] == ["error_rate"]
    assert report["stopped_early"] and report["seconds"] == 5  # the first scrape: 50 requests, enough to judge
    e = check(report, "error_rate")
    assert e["canary"] == pytest.approx(0.2) and e["old"] == 0 and e["passed"] is False
    msg = canary.message(report)
    assert "stopped early" in msg and "error rate (5xx) canary 20.00% vs old 0.00%" in msg and "BREACH" in msg


def test_client_errors_count_against_the_canary_only_beyond_the_old_hosts(hosts):
    c, o = hosts("2"), hosts()

    def step(s):  # both sides refuse 30% of requests (a client sending garbage): not a breach
        for h in (c, o):
            h.serve(70)
            h.serve(30, status=422)
    report, _ = run([c], [o], seconds=20, step=step)
    assert report["passed"], canary.message(report)
    assert check(report, "client_error_rate")["canary"] == pytest.approx(0.3)

    c2, o2 = hosts("2"), hosts()

    def refuses(s):  # the new version refuses what the old one accepted
        c2.serve(70)
        c2.serve(30, status=400)
        o2.serve(100)
    report, _ = run([c2], [o2], seconds=20, step=refuses)
    assert not report["passed"] and report["breached"] == ["client_error_rate"]


def test_latency_breach_is_judged_over_the_window(hosts):
    c, o = hosts("2"), hosts()

    def step(s):
        c.serve(95, seconds=0.004)
        c.serve(5, seconds=0.4)    # p99 in the (0.25, 0.5] bucket
        o.serve(100, seconds=0.004)
    report, t = run([c], [o], seconds=20, step=step)
    p = check(report, "p99_ms")
    assert not report["passed"] and report["breached"] == ["p99_ms"] and not report["stopped_early"]
    assert p["canary"] > 250 and p["old"] < 5 and p["allowed"] == pytest.approx(p["old"] * 1.5 + 10)
    # a small slowdown within ratio + slack passes
    c2, o2 = hosts("2"), hosts()

    def slightly(s):
        c2.serve(100, seconds=0.008)
        o2.serve(100, seconds=0.004)
    assert run([c2], [o2], seconds=20, step=slightly)[0]["passed"]


def test_prediction_distribution_far_from_the_old_hosts(hosts):
    c, o = hosts("2"), hosts()

    def step(s):
        c.serve(60, label="1")
        c.serve(40, label="0")
        o.serve(10, label="1")
        o.serve(90, label="0")
    report, _ = run([c], [o], seconds=20, step=step)
    shift = check(report, "prediction_shift")
    assert shift["value"] == pytest.approx(0.5) and report["breached"] == ["prediction_shift"]
    assert shift["canary"] == {"0": 0.4, "1": 0.6} and shift["old"] == {"0": 0.9, "1": 0.1}
    assert "predictions canary {1: 60%, 0: 40%} vs old {0: 90%, 1: 10%}, shift 0.500" in canary.message(report)


def test_regressor_values_are_compared_by_histogram_bins(hosts):
    c, o = hosts("2"), hosts()

    def step(s):
        for i in range(100):
            c.serve(1, value=150 + i)   # (100, 200] and (200, 300]
            o.serve(1, value=20 + i / 2)  # (10, 50] and (50, 100]
    report, _ = run([c], [o], seconds=10, step=step, limits={"max_prediction_shift": 0.5})
    assert check(report, "prediction_shift")["value"] == pytest.approx(1.0) and not report["passed"]
    assert set(report["canary"]["predictions"]) == {"(100, 200]", "(200, 300]"}


def test_not_enough_traffic_passes_with_a_note_or_fails(hosts):
    c, o = hosts("2"), hosts()

    def step(s):
        c.serve(1, status=500)   # 100% errors, but 6 requests are not enough to judge
        o.serve(1)
    report, _ = run([c], [o], seconds=30, step=step)
    assert report["verdict"] == "not_enough_traffic" and report["passed"]
    assert any("not enough traffic: the canary answered 6 prediction requests, fewer than 50" in n for n in report["notes"])
    report, _ = run([c], [o], seconds=30, step=step, limits={"quiet": "fail"})
    assert report["verdict"] == "not_enough_traffic" and not report["passed"]
    assert "not enough traffic to judge the canary" in canary.message(report)


def test_without_old_hosts_the_canary_is_judged_alone(hosts):
    c = hosts("2")
    report, _ = run([c], [], seconds=20, step=lambda s: c.serve(100))
    assert report["passed"] and report["old"] is None and check(report, "p99_ms")["passed"] is None
    assert any("no host on the old version" in n for n in report["notes"])
    bad = hosts("2")

    def step(s):
        bad.serve(95)
        bad.serve(5, status=503)
    report, _ = run([bad], [], seconds=20, step=step)
    assert report["breached"] == ["error_rate"]


def test_hosts_that_cannot_be_compared_are_left_out(hosts):
    c, o_down, o_new, o_restarts, o = hosts("2"), hosts(), hosts("2"), hosts(), hosts()
    o_down.down = True
    o_restarts.serve(100)  # before the bake: a restart takes its counters below where they started

    def step(s):
        for h in (c, o_new, o_restarts, o):
            h.serve(30)
        if o_restarts.requests.labels("/invocations", "200")._value.get() > 160:
            o_restarts.restart()
    report, _ = run([c], [o_down, o_new, o_restarts, o], seconds=30, step=step, expect_version=2)
    assert report["passed"] and report["old_hosts"] == ["o4"], report["notes"]
    notes = " | ".join(report["notes"])
    assert "o1 left out: " in notes and "HTTP 503 at the start" in notes
    assert "o2 left out: it already serves v2" in notes
    assert "o3 left out: it restarted during the bake" in notes
    assert report["old"]["requests"] == 180


def test_an_old_host_lost_at_the_end_keeps_its_last_figures(hosts):
    c, o = hosts("2"), hosts()

    def step(s):
        c.serve(20)
        o.serve(20)
        if c.requests.labels("/invocations", "200")._value.get() >= 100:
            o.down = True
    report, _ = run([c], [o], seconds=30, step=step)
    assert report["passed"] and report["old"]["requests"] == 80 and report["canary"]["requests"] == 120
    assert any("o1: " in n and "at the end" in n for n in report["notes"])


def test_a_canary_that_stops_answering_restarts_or_changes_version_fails(hosts):
    c, o = hosts("2"), hosts()

    def dies(s):
        c.serve(20)
        o.serve(20)
        c.down = c.requests.labels("/invocations", "200")._value.get() >= 40
    report, _ = run([c], [o], seconds=60, step=dies)
    assert not report["passed"] and "canary_unavailable" in report["breached"]
    assert report["failure"].startswith("the canary c1: ") and report["seconds"] < 60
    assert report["canary"]["requests"] == 20  # its figures up to its last answer

    c2, o2 = hosts("2"), hosts()
    c2.serve(100)

    def restarts(s):
        c2.serve(20)
        o2.serve(20)
        c2.restart()
    report, _ = run([c2], [o2], seconds=30, step=restarts)
    assert not report["passed"] and "restarted during the bake" in report["failure"]

    c3 = hosts("1")  # fell back to the old version
    report, _ = run([c3], [hosts()], seconds=30, expect_version=2)
    assert not report["passed"] and report["failure"] == "the canary c1 serves v1, not v2" and report["seconds"] == 0

    c4 = hosts("2")
    c4.down = True
    report, _ = run([c4], [hosts()], seconds=30)
    assert not report["passed"] and "it cannot be watched" in report["failure"]


def test_usage_errors():
    with pytest.raises(UsageError):
        canary.bake([], [], 10)
    with pytest.raises(UsageError):
        canary.bake(["http://x"], [], 0)
    with pytest.raises(UsageError):
        canary.weights_for({"a": 1}, {"b": 1}, 1.0)


def test_cli_prints_both_sides_and_exits_1_on_a_breach(hosts):
    """Real time: the bake scrapes while a thread sends traffic."""
    c, o = hosts("2"), hosts()
    stop_ = threading.Event()

    def traffic():
        while not stop_.is_set():
            c.serve(5)
            c.serve(5, status=500)
            o.serve(10)
            stop_.wait(0.05)
    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        r = run_cli("fleet", "bake", "--canary", f"ms1={c.url}", "--baseline", f"ms2={o.url}", "--seconds", "3",
                    "--interval", "0.5", "--expect-version", "2", "--min-requests", "20", env={"MLPIPE_TOKEN": "s3cret"})
    finally:
        stop_.set()
        t.join()
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["verdict"] == "breach" and report["breached"] == ["error_rate"] and report["stopped_early"]
    assert report["canary"]["error_rate"] == pytest.approx(0.5, abs=0.1) and report["old"]["error_rate"] == 0
    assert r.stderr.startswith("error: bake over ") and "error rate (5xx) canary" in r.stderr
    assert c.auth[-1] == "Bearer s3cret"
    ok = run_cli("fleet", "bake", "--canary", c.url, "--seconds", "0.5", "--interval", "0.2")
    assert ok.returncode == 0 and json.loads(ok.stdout)["verdict"] == "not_enough_traffic"


def test_weights_give_the_canary_its_share():
    w = canary.weights_for({"ms1": 1}, {"ms2": 1, "ms3": 1}, 0.10)
    assert w["ms2"] == w["ms3"] and w["ms1"] / sum(w.values()) == pytest.approx(0.10)
    w = canary.weights_for({"ms1": 1}, {"ms2": 1, "ms3": 2}, 0.25)
    assert w["ms3"] == 2 * w["ms2"] and w["ms1"] / sum(w.values()) == pytest.approx(0.25)
    for share in (0.01, 0.05, 0.5, 0.9):  # 0.99 needs more than HAProxy's 256 against 9 others
        w = canary.weights_for({"a": 1}, {f"o{i}": 1 for i in range(9)}, share)
        assert all(1 <= v <= 256 for v in w.values())
        assert w["a"] / sum(w.values()) == pytest.approx(share, abs=0.02)


@pytest.fixture
def haproxy(tmp_path):
    ports = [free_port() for _ in range(3)]
    listeners = [subprocess.Popen(["python3", "-m", "http.server", str(p), "--bind", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path) for p in ports]
    for p, proc in zip(ports, listeners):
        wait_port("127.0.0.1", p, proc)
    servers = [f"ms1 127.0.0.1:{ports[0]}", f"ms2 127.0.0.1:{ports[1]}", f"ms3 127.0.0.1:{ports[2]} weight 2"]
    try:
        with haproxy_backend(tmp_path, servers) as sock:
            from mlpipe.fleet import lb_status
            import time
            deadline = time.monotonic() + 10
            while len(lb_status(sock, "mlpipe")["up"]) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            yield sock
    finally:
        for p in listeners:
            stop(p)


@pytest.mark.integration
def test_lb_weights_set_and_reset_on_a_real_haproxy(haproxy):
    out = canary.set_canary_weights(haproxy, "mlpipe", ["ms1"], 10)
    assert out["changed"] and out["share"] == pytest.approx(0.10, abs=0.005)
    now = canary.server_weights(haproxy, "mlpipe")
    assert now["ms3"]["weight"] == 2 * now["ms2"]["weight"] and now["ms3"]["initial"] == 2
    assert canary.set_canary_weights(haproxy, "mlpipe", ["ms1"], 10)["changed"] is False  # idempotent
    # a drained server keeps its weight (draining is an admin state) and is not counted as up
    subprocess.run(["python3", "-c", f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({haproxy!r}); "
                    "s.sendall(b'set server mlpipe/ms3 state drain\\n'); s.recv(100)"], check=True)
    r = run_cli("fleet", "lb-weights", "--socket", haproxy, "--backend", "mlpipe", "--reset")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["changed"] is True
    assert {s: v["weight"] for s, v in canary.server_weights(haproxy, "mlpipe").items()} == {"ms1": 1, "ms2": 1, "ms3": 2}
    again = run_cli("fleet", "lb-weights", "--socket", haproxy, "--backend", "mlpipe", "--reset")
    assert json.loads(again.stdout) == {"changed": False, "reset": {}, "backends": {"mlpipe": {"changed": False, "reset": {}}}}
    # ms3 drained: the canary's share is among ms1 and ms2 only
    out = json.loads(run_cli("fleet", "lb-weights", "--socket", haproxy, "--backend", "mlpipe", "--canary", "ms1",
                             "--share", "25").stdout)
    assert out["share"] == pytest.approx(0.25, abs=0.01) and set(out["weights"]) == {"ms1", "ms2"}
    bad = run_cli("fleet", "lb-weights", "--socket", haproxy, "--backend", "mlpipe", "--canary", "ms9", "--share", "10")
    assert bad.returncode == 3 and "no server ms9" in bad.stderr
    assert run_cli("fleet", "lb-weights", "--socket", haproxy, "--backend", "mlpipe").returncode == 3
