"""Prometheus metrics: counted in memory per worker, written to the multi-process files in batches,
rendered for ``GET /metrics``."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mlpipe.serve.model import LoadedModel

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
VALUE_BUCKETS = (-1e3, -100, -10, -1, 0, 1, 10, 50, 100, 200, 300, 500, 1e3, 1e4)


class _Pending:
    """What a worker counted since its last write to the shared metric files."""

    def __init__(self):
        self.requests: dict = {}     # (endpoint, status) -> count
        self.latency: dict = {}      # endpoint -> [seconds]
        self.rows: dict = {}         # version -> count
        self.classes: dict = {}      # (version, label) -> count
        self.values: dict = {}       # version -> [predicted values]


class _Metrics:
    """Prometheus metrics, batched: a multi-process write costs ~9 us, so each worker adds up its
    counts in memory and a background thread writes them every FLUSH_SECONDS (and every scrape
    flushes first). The thread starts with the first count, so it lives in the worker, after fork."""

    FLUSH_SECONDS = 0.5

    def __init__(self):
        import threading
        _multiprocess_dir()
        from prometheus_client import Counter, Gauge, Histogram
        self.requests = Counter("mlpipe_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"])
        self.latency = Histogram("mlpipe_request_seconds", "Request latency by endpoint and model", ["endpoint", "model"],
                                 buckets=LATENCY_BUCKETS)
        self.rows = Counter("mlpipe_predicted_rows", "Rows predicted", ["model", "version"])
        self.classes = Counter("mlpipe_predictions", "Predicted labels (classifiers)", ["model", "version", "label"])
        self.values = Histogram("mlpipe_prediction_value", "Predicted values (regressors)", ["model", "version"],
                                buckets=VALUE_BUCKETS)
        self.info = Gauge("mlpipe_model_info", "The model version a worker serves (1)",
                          ["name", "version", "id", "runtime"], multiprocess_mode="livemax")
        self.ready = Gauge("mlpipe_model_ready", "1 when a model is loaded", multiprocess_mode="livemin")
        self.load_failures = Counter("mlpipe_model_load_failures", "Versions refused at load", ["model", "version"])
        self.captured = Counter("mlpipe_capture_rows", "Prediction rows written to the capture database")
        self.capture_dropped = Counter("mlpipe_capture_dropped_rows", "Sampled prediction rows not captured, by "
                                       "reason (queue_full: the database is slower than the traffic; db_error: "
                                       "it failed or is unreachable)", ["reason"])
        self.capture_queue = Gauge("mlpipe_capture_queue_rows", "Rows waiting to be written to the capture database",
                                   multiprocess_mode="livesum")
        self.capture_source = None   # a Capture: its counts are added at every flush
        self._capture_seen: dict = {}
        self._info_labels: dict = {}  # slot -> the labels of the version it serves
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._timer = None

    def set_model(self, m: LoadedModel | None, key: str = "") -> None:
        """What the slot ``key`` serves now (None: nothing); ready is 1 when every slot serves one."""
        before = self._info_labels.get(key)
        if before:
            self.info.labels(*before).set(0)
        self._info_labels[key] = None
        if m is not None:
            self._info_labels[key] = (m.name, m.version_label, m.manifest.get("id", ""), m.runtime)
            self.info.labels(*self._info_labels[key]).set(1)
        self.ready.set(1 if self._info_labels and all(self._info_labels.values()) else 0)

    def drop_model(self, key: str) -> None:
        """A slot that is gone (its folder was removed from a multi-model host)."""
        before = self._info_labels.pop(key, None)
        if before:
            self.info.labels(*before).set(0)
        self.ready.set(1 if self._info_labels and all(self._info_labels.values()) else 0)

    def request(self, endpoint: str, status: int, seconds: float, model: str = "") -> None:
        key = (endpoint, model, status)
        with self._lock:
            p = self._pending
            p.requests[key] = p.requests.get(key, 0) + 1
            p.latency.setdefault((endpoint, model), []).append(seconds)
        if self._timer is None:
            self._start_timer()

    def predictions(self, m: LoadedModel, labels) -> None:
        v = (m.name, m.version_label)
        with self._lock:
            p = self._pending
            p.rows[v] = p.rows.get(v, 0) + len(labels)
            if m.kind == "classification":
                for label in labels if type(labels) is list else labels.tolist() if hasattr(labels, "tolist") else labels:
                    p.classes[(*v, label)] = p.classes.get((*v, label), 0) + 1
            else:
                p.values.setdefault(v, []).extend(np.asarray(labels, dtype=np.float64).tolist())

    def _start_timer(self) -> None:
        import threading

        def tick():
            while True:
                time.sleep(self.FLUSH_SECONDS)
                self.flush()
        self._timer = threading.Thread(target=tick, name="mlpipe-metrics-flush", daemon=True)
        self._timer.start()

    def flush(self) -> None:
        with self._lock:
            p, self._pending = self._pending, _Pending()
        for (endpoint, model, status), n in p.requests.items():
            self.requests.labels(endpoint, model, str(status)).inc(n)
        for (endpoint, model), obs in p.latency.items():
            _observe_many(self.latency.labels(endpoint, model), obs, LATENCY_BUCKETS)
        for (model, v), n in p.rows.items():
            self.rows.labels(model, v).inc(n)
        for (model, v, label), n in p.classes.items():
            self.classes.labels(model, v, str(label)).inc(n)
        for (model, v), obs in p.values.items():
            _observe_many(self.values.labels(model, v), obs, VALUE_BUCKETS)
        if self.capture_source is not None:
            self._flush_capture(self.capture_source.stats())

    def _flush_capture(self, stats: dict | None) -> None:
        if not stats:
            return
        seen = self._capture_seen
        n = stats.get("captured", 0) - seen.get("captured", 0)
        if n > 0:
            self.captured.inc(n)
        for reason, count in (stats.get("dropped") or {}).items():
            n = count - seen.get(("dropped", reason), 0)
            if n > 0:
                self.capture_dropped.labels(reason).inc(n)
            seen[("dropped", reason)] = count
        seen["captured"] = stats.get("captured", 0)
        self.capture_queue.set(stats.get("queued", 0))


def _observe_many(hist, observations: list, buckets: tuple) -> None:
    """Histogram.observe for many values with one write per touched bucket, not one per value."""
    import bisect
    counts: dict = {}
    for x in observations:
        i = bisect.bisect_left(buckets, x)
        counts[i] = counts.get(i, 0) + 1
    hist._sum.inc(sum(observations))
    for i, n in counts.items():
        hist._buckets[i].inc(n)


_METRICS: _Metrics | None = None


def _multiprocess_dir() -> str | None:
    """Under gunicorn (its arbiter sets SERVER_SOFTWARE in the environment), share one metrics folder
    between the workers of a master (by its pid)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if "gunicorn" in os.environ.get("SERVER_SOFTWARE", "") or os.environ.get("MLPIPE_UNDER_GUNICORN"):
        d = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlpipe-metrics-{os.getppid()}"
        d.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
        return str(d)
    return None


def metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = _Metrics()
    return _METRICS


def _reap_dead_workers(directory: str) -> None:
    """Gauges of workers that exited (an old generation after a reload) must not linger."""
    from prometheus_client import multiprocess
    seen = set()
    for f in Path(directory).glob("gauge_live*_*.db"):
        try:
            pid = int(f.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if pid in seen:
            continue
        seen.add(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass


def render_metrics() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
    metrics().flush()
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if d:
        _reap_dead_workers(d)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=d)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
