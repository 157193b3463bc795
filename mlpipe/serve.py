"""The REST API generated from a model's manifest, as a Flask app factory run by gunicorn::

    gunicorn -c python:mlpipe.gunicorn_conf 'mlpipe.serve:create_app()'

Endpoints: Open Inference Protocol v2 (``/v2/...``), the MLflow scoring protocol
(``/invocations``, ``/ping``, ``/version``), ``/metadata``, ``/openapi.json``, ``/metrics``, and
``POST /feedback`` (true labels for earlier predictions, by request id).

Every prediction answer carries a request id (``X-Request-Id`` header and ``request_id`` in the body;
a client's own ``X-Request-Id`` is kept). A sampled share of predictions is captured (``mlpipe.capture``:
inputs, prediction, version, host, latency) by a background thread: the request never waits on the
capture database, and a slow or dead one costs captured rows (``mlpipe_capture_dropped_rows_total``),
never a failed or slower prediction.

The model is read from ``<model_dir>/current`` (see ``mlpipe.hostdir``). Each worker verifies the
sha256 of what it loads, loads it and warms it before it answers. A graceful reload (SIGHUP to the
gunicorn master) boots new workers on the new ``current`` while the old ones finish their requests.
A version that fails verification is refused: the worker keeps serving the last version that loaded
(``.last-good``), and says so in ``/metadata`` and ``/metrics``.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import math
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

from mlpipe import __version__, artifact, hostdir
from mlpipe.errors import (IntegrityError, MlpipeError, NotFound, NotReady, PayloadTooLarge, Unauthorized,
                           UnsupportedMediaType, UsageError, ValidationError)

log = logging.getLogger("mlpipe.serve")

DEFAULTS = {"model_dir": "", "bind": "127.0.0.1:8000", "workers": 2, "auth_tokens": [], "max_rows": 10000,
            "max_body_bytes": 10 * 1024 * 1024, "require_onnx": False, "timeout": 30,
            "capture_db": "", "capture_sample": None, "capture_max_age": None, "capture_max_rows": None,
            "host": ""}
ENV = {"model_dir": "MLPIPE_MODEL_DIR", "bind": "MLPIPE_BIND", "workers": "MLPIPE_WORKERS",
       "auth_tokens": "MLPIPE_AUTH_TOKENS", "max_rows": "MLPIPE_MAX_ROWS", "max_body_bytes": "MLPIPE_MAX_BODY_BYTES",
       "require_onnx": "MLPIPE_REQUIRE_ONNX", "timeout": "MLPIPE_TIMEOUT", "capture_db": "MLPIPE_CAPTURE_DB",
       "capture_sample": "MLPIPE_CAPTURE_SAMPLE", "capture_max_age": "MLPIPE_CAPTURE_MAX_AGE",
       "capture_max_rows": "MLPIPE_CAPTURE_MAX_ROWS", "host": "MLPIPE_HOST"}
DEFAULT_CAPTURE_SAMPLE = 0.1   # when neither the server nor the served version's spec (capture.sample) says
DEFAULT_CAPTURE_RETENTION = {"max_age": 30 * 86400, "max_rows": 1_000_000}   # the same, for capture.max_age/max_rows
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
LAST_GOOD = ".last-good"
_NUMERIC_OIP = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
_OIP_NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
           "FP32": np.float32, "FP64": np.float64}


# ------------------------------------------------------------------------------------ configuration
def _coerce(key: str, value: Any) -> Any:
    if key == "auth_tokens":
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        tokens = [str(t).strip() for t in (value or [])]
        if "" in tokens or any(any(c.isspace() for c in t) for t in tokens):
            raise UsageError("serve setting 'auth_tokens' has an empty token or one with whitespace",
                             hint="every token must be a non-empty string without spaces (an empty one would let "
                                  "requests without a token in)")
        return tokens
    if key == "capture_sample":
        if value in (None, ""):
            return None
        try:
            share = float(value)
        except (TypeError, ValueError):
            share = -1.0
        if isinstance(value, bool) or not 0 <= share <= 1:
            raise UsageError(f"serve setting 'capture_sample' must be a share between 0 and 1, got {value!r}",
                             hint="0 turns capture off, 0.1 records one request in ten, 1 records every request")
        return share
    if key in ("capture_max_age", "capture_max_rows") and value in (None, ""):
        return None  # the served version's spec (capture.max_age / max_rows), else 30d / 1,000,000
    if key == "capture_max_age":
        from mlpipe.spec import parse_duration
        from mlpipe.errors import SpecError
        try:
            return parse_duration(value, "serve setting 'capture_max_age'")
        except SpecError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None
    if key == "capture_db" and value:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        try:
            make_url(str(value))
        except ArgumentError:
            raise UsageError("serve setting 'capture_db' is not a database URL",
                             hint="write sqlite:////var/lib/mlpipe/capture.db or "
                                  "postgresql://user:password@host/db (empty: a SQLite file under the host's root)") from None
        return str(value)
    if key in ("workers", "max_rows", "max_body_bytes", "timeout", "capture_max_rows"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"serve setting '{key}' must be a whole number, got {value!r}") from None
    if key == "require_onnx":
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    return value


def load_config(config: dict | None = None) -> dict:
    """Defaults < file (MLPIPE_SERVE_CONFIG, YAML or JSON) < environment < ``config``."""
    out = dict(DEFAULTS)
    path = (config or {}).get("config_file") or os.environ.get("MLPIPE_SERVE_CONFIG")
    if path:
        import yaml
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read serve config {path}: {exc}") from None
        unknown = set(data) - set(DEFAULTS)
        if unknown:
            raise UsageError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}",
                             hint=f"known: {', '.join(sorted(DEFAULTS))}")
        out.update(data)
    if os.environ.get("MLPIPE_AUTH_TOKENS_FILE"):
        out["auth_tokens"] = Path(os.environ["MLPIPE_AUTH_TOKENS_FILE"]).read_text().split()
    for key, env in ENV.items():
        if os.environ.get(env) not in (None, ""):
            out[key] = os.environ[env]
    for key, value in (config or {}).items():
        if key != "config_file":
            out[key] = value
    out = {k: _coerce(k, v) for k, v in out.items()}
    if not out["model_dir"]:
        raise UsageError("no model directory configured",
                         hint="set MLPIPE_MODEL_DIR (a folder with a 'current' symlink, see mlpipe models pull --activate)")
    return out


# ------------------------------------------------------------------------------------------ models
@dataclass
class LoadedModel:
    manifest: dict
    runtime: str                     # "onnxruntime" or "sklearn"
    path: Path
    loaded_at: float = field(default_factory=time.time)
    _model: Any = None
    _sess: Any = None
    _input_name: str = ""
    _input_dtype: Any = np.float64
    _outputs: list = field(default_factory=list)
    _run: Any = None

    def __post_init__(self):
        sig = self.manifest["signature"]
        self.name = self.manifest["name"]
        self.version = int(self.manifest["version"])
        self.features = [i["name"] for i in sig["inputs"]]
        self.datatypes = [i["datatype"] for i in sig["inputs"]]
        self.index = {n: i for i, n in enumerate(self.features)}
        self.numeric = all(d in _NUMERIC_OIP for d in self.datatypes)
        self.allow_nan = bool(sig.get("allow_nan"))
        self.kind = sig["target"]["kind"]
        self.classes = sig["target"].get("classes") or []
        self.target_datatype = artifact.oip_datatype(sig["target"]["dtype"]) if self.kind == "classification" else "FP64"
        self.version_label = str(self.version)
        spec_capture = (self.manifest.get("spec") or {}).get("capture") or {}
        self.spec_sample = spec_capture.get("sample") if isinstance(spec_capture, dict) else None

    @classmethod
    def load(cls, path: Path, require_onnx: bool = False) -> "LoadedModel":
        manifest = artifact.read_manifest(path)
        files = manifest.get("files", {})
        if artifact.ONNX_FILE in files:
            artifact.verify_dir(path, manifest, only=[artifact.ONNX_FILE])
            from mlpipe import onnx
            m = cls(manifest, "onnxruntime", path)
            m._sess = onnx.session((path / artifact.ONNX_FILE).read_bytes())
            inp = m._sess.get_inputs()[0]
            m._input_name = inp.name
            m._input_dtype = np.float32 if inp.type == "tensor(float)" else np.float64
            m._outputs = [o.name for o in m._sess.get_outputs()]
            m._run = m._sess._sess.run if hasattr(m._sess, "_sess") else None  # skips per-call Python checks
            m.allow_nan = False  # the ONNX agreement check covered finite inputs only
            skew = artifact.sklearn_skew(manifest)
            if skew:
                log.info("version %s at %s was trained with scikit-learn %s (this host has %s); served through "
                         "ONNX Runtime, which does not depend on scikit-learn", manifest.get("version"), path, *skew)
        elif require_onnx:
            raise IntegrityError(f"version {manifest.get('version')} at {path} has no model.onnx and this server "
                                 "refuses to unpickle (require_onnx)", hint="register a model skl2onnx can convert, or turn require_onnx off")
        else:
            model, manifest = artifact.load_model(path, manifest)  # refuses a scikit-learn major.minor skew
            m = cls(manifest, "sklearn", path)
            m._model = model
        m.warm()
        return m

    def warm(self) -> None:
        if self.numeric:
            self.predict(np.zeros((1, len(self.features))), proba=self.kind == "classification")

    def predict(self, X, proba: bool = False):
        """X: float matrix (numeric models) or DataFrame. Returns (labels, probabilities or None)."""
        if self._sess is not None:
            feed = {self._input_name: np.ascontiguousarray(X, dtype=self._input_dtype)}
            outs = self._run(self._outputs, feed, None) if self._run else self._sess.run(None, feed)
            labels = outs[0].ravel() if self.kind == "regression" or outs[0].ndim > 1 else outs[0]
            return labels, (outs[1] if proba and len(outs) > 1 else None)
        if self.numeric and isinstance(X, np.ndarray):
            import pandas as pd
            X = pd.DataFrame(X, columns=self.features)
        labels = self._model.predict(X)
        probs = self._model.predict_proba(X) if proba and hasattr(self._model, "predict_proba") else None
        return labels, probs


class ModelSlot:
    """What one worker serves, and why it serves it."""

    def __init__(self, model_dir: Path, require_onnx: bool):
        self.model_dir = Path(model_dir)
        self.require_onnx = require_onnx
        self.model: LoadedModel | None = None
        self.error: str | None = None

    def _candidates(self) -> list[int]:
        out = []
        for v in (hostdir.current(self.model_dir), self._last_good(), hostdir.previous(self.model_dir)):
            if v is not None and v not in out:
                out.append(v)
        return out

    def _last_good(self) -> int | None:
        try:
            return int((self.model_dir / LAST_GOOD).read_text().strip())
        except (OSError, ValueError):
            return None

    def _mark_good(self, version: int) -> None:
        try:
            tmp = self.model_dir / f".last-good.{os.getpid()}"
            tmp.write_text(str(version))
            os.replace(tmp, self.model_dir / LAST_GOOD)
        except OSError:
            pass

    def load(self) -> None:
        wanted = hostdir.current(self.model_dir)
        errors = []
        for version in self._candidates():
            try:
                self.model = LoadedModel.load(self.model_dir / str(version), self.require_onnx)
            except (MlpipeError, OSError, ValueError, KeyError) as exc:
                errors.append(f"v{version}: {exc}")
                metrics().load_failures.labels(version=str(version)).inc()
                log.error("refusing model v%s in %s: %s", version, self.model_dir, exc)
                continue
            self.error = "; ".join(errors) or None
            if version == wanted:
                self._mark_good(version)
            log.info("serving %s v%s (%s)%s", self.model.name, version, self.model.runtime,
                     "" if version == wanted else f" instead of current v{wanted}")
            break
        else:
            self.model = None
            self.error = "; ".join(errors) or hostdir.nothing_active(self.model_dir)
        metrics().set_model(self.model)


# ----------------------------------------------------------------------------------------- capture
def request_id(given: str | None) -> str:
    """The client's own id when it is a sane one (X-Request-Id), else a new random one."""
    if given and REQUEST_ID_RE.match(given):
        return given
    return os.urandom(12).hex()


class Capture:
    """This worker's sampled prediction capture: decides per request whether to record it and hands
    what to record to a ``mlpipe.capture.Recorder`` (bounded queue, background writer). Nothing here
    waits on the database or raises into the request."""

    def __init__(self, cfg: dict):
        self.url = cfg["capture_db"] or None
        self.fixed = cfg["capture_sample"]
        self.host = cfg["host"] or socket.gethostname()
        self.max_age, self.max_rows = cfg["capture_max_age"], cfg["capture_max_rows"]
        self._recorder = None
        self._store = None
        self._broken = False

    def share(self, m: LoadedModel) -> float:
        if self.fixed is not None:
            return self.fixed
        s = m.spec_sample
        if isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1:
            return float(s)
        return DEFAULT_CAPTURE_SAMPLE

    def retention(self, m: LoadedModel) -> tuple[int, int]:
        """(max age in seconds, max rows per model): the host's settings, else the served version's spec."""
        from mlpipe.spec import parse_duration
        spec = (m.manifest.get("spec") or {}).get("capture") or {}
        age, rows = self.max_age, self.max_rows
        if age is None:
            try:
                age = parse_duration(spec.get("max_age"), "capture.max_age") if spec.get("max_age") else None
            except MlpipeError:
                age = None
        if rows is None and isinstance(spec.get("max_rows"), int) and spec["max_rows"] > 0:
            rows = spec["max_rows"]
        return (age or DEFAULT_CAPTURE_RETENTION["max_age"], rows or DEFAULT_CAPTURE_RETENTION["max_rows"])

    def recorder(self, m: LoadedModel):
        if self._recorder is None and not self._broken:
            try:
                from mlpipe import capture
                age, rows = self.retention(m)
                self._recorder = capture.Recorder(capture.db_url(self.url), host=self.host,
                                                  max_age_seconds=age, max_rows=rows)
            except Exception as exc:  # a capture bug must never cost a prediction
                self._broken = True
                log.error("prediction capture is off in this worker: %s", exc)
        return self._recorder

    def offer(self, m: LoadedModel, rid: str, X, labels, t0: float | None) -> None:
        """``t0`` None: not captured (a request that says ``X-Mlpipe-Capture: off``, such as the deploy's
        and the monitor's own checks: synthetic traffic would pass for live traffic)."""
        if t0 is None:
            return
        share = self.share(m)
        if share <= 0 or (share < 1 and random.random() >= share):
            return
        rec = self.recorder(m)
        if rec is None:
            return
        try:
            rec.offer(m.name, m.version, rid, m.features, X, labels, (time.perf_counter() - t0) * 1000.0)
        except Exception as exc:  # documented never to raise; belt and braces on the request path
            log.error("prediction capture failed: %s", exc)

    def stats(self) -> dict | None:
        return self._recorder.stats() if self._recorder is not None else None

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until what is queued was written or dropped (tests, benchmarks)."""
        if self._recorder is not None:
            self._recorder.flush(timeout)
        metrics().flush()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (at most ``timeout`` seconds): a worker that stops loses no captured row
        the database would take."""
        if self._recorder is not None:
            try:
                self._recorder.close(timeout=timeout)
            except Exception as exc:
                log.error("prediction capture: rows still queued at exit were lost: %s", exc)

    def store(self):
        if self._store is None:
            from mlpipe import capture
            self._store = capture.Store(capture.db_url(self.url))
        return self._store


_FEEDBACK_MAX = 10000


def parse_feedback(doc) -> list[tuple[str, int, Any]]:
    """``{"request_id": ..., "label": ..., "row": 0}`` or a list of them -> [(request_id, row, label)]."""
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise _bad("no labels in the body", hint='send {"request_id": "...", "label": ...} or a list of those')
    if len(items) > _FEEDBACK_MAX:
        raise PayloadTooLarge(f"{len(items)} labels is more than one request takes ({_FEEDBACK_MAX})",
                              hint="split them, or load a file with mlpipe feedback load MODEL FILE")
    out = []
    for i, it in enumerate(items):
        where = f"item {i}" if isinstance(doc, list) else "the body"
        if not isinstance(it, dict):
            raise _bad(f"{where} is {type(it).__name__}, expected an object",
                       hint='e.g. {"request_id": "5f3a...", "label": 1}')
        unknown = set(it) - {"request_id", "label", "row", "model"}
        if unknown:
            raise _bad(f"{where} has unknown key(s) {', '.join(sorted(unknown))}",
                       hint="keys: request_id, label, row (optional, default 0)")
        rid, label, row = it.get("request_id"), it.get("label"), it.get("row", 0)
        if not isinstance(rid, str) or not REQUEST_ID_RE.match(rid):
            raise _bad(f"{where}: request_id must be the id a prediction answered with (X-Request-Id), got "
                       f"{json.dumps(rid)[:70]}")
        if label is None or not isinstance(label, (str, int, float, bool)) or (
                isinstance(label, float) and not math.isfinite(label)):
            raise _bad(f"{where}: label must be a string or a finite number, got {json.dumps(label)[:70]}")
        if isinstance(row, bool) or not isinstance(row, int) or row < 0:
            raise _bad(f"{where}: row must be a non-negative integer (the row of a multi-row request), got {row!r}")
        out.append((rid, row, label))
    return out


# ----------------------------------------------------------------------------------------- metrics
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
        self.requests = Counter("mlpipe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"])
        self.latency = Histogram("mlpipe_request_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS)
        self.rows = Counter("mlpipe_predicted_rows", "Rows predicted", ["version"])
        self.classes = Counter("mlpipe_predictions", "Predicted labels (classifiers)", ["version", "label"])
        self.values = Histogram("mlpipe_prediction_value", "Predicted values (regressors)", ["version"],
                                buckets=VALUE_BUCKETS)
        self.info = Gauge("mlpipe_model_info", "The model version a worker serves (1)",
                          ["name", "version", "id", "runtime"], multiprocess_mode="livemax")
        self.ready = Gauge("mlpipe_model_ready", "1 when a model is loaded", multiprocess_mode="livemin")
        self.load_failures = Counter("mlpipe_model_load_failures", "Versions refused at load", ["version"])
        self.captured = Counter("mlpipe_capture_rows", "Prediction rows written to the capture database")
        self.capture_dropped = Counter("mlpipe_capture_dropped_rows", "Sampled prediction rows not captured, by "
                                       "reason (queue_full: the database is slower than the traffic; db_error: "
                                       "it failed or is unreachable)", ["reason"])
        self.capture_queue = Gauge("mlpipe_capture_queue_rows", "Rows waiting to be written to the capture database",
                                   multiprocess_mode="livesum")
        self.capture_source = None   # a Capture: its counts are added at every flush
        self._capture_seen: dict = {}
        self._info_labels = None
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._timer = None

    def set_model(self, m: LoadedModel | None) -> None:
        if self._info_labels:
            self.info.labels(*self._info_labels).set(0)
        if m is not None:
            self._info_labels = (m.name, m.version_label, m.manifest.get("id", ""), m.runtime)
            self.info.labels(*self._info_labels).set(1)
        self.ready.set(1 if m is not None else 0)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        with self._lock:
            p = self._pending
            p.requests[key] = p.requests.get(key, 0) + 1
            p.latency.setdefault(endpoint, []).append(seconds)
        if self._timer is None:
            self._start_timer()

    def predictions(self, m: LoadedModel, labels) -> None:
        v = m.version_label
        with self._lock:
            p = self._pending
            p.rows[v] = p.rows.get(v, 0) + len(labels)
            if m.kind == "classification":
                for label in labels.tolist() if hasattr(labels, "tolist") else labels:
                    p.classes[(v, label)] = p.classes.get((v, label), 0) + 1
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
        for (endpoint, status), n in p.requests.items():
            self.requests.labels(endpoint, str(status)).inc(n)
        for endpoint, obs in p.latency.items():
            _observe_many(self.latency.labels(endpoint), obs, LATENCY_BUCKETS)
        for v, n in p.rows.items():
            self.rows.labels(v).inc(n)
        for (v, label), n in p.classes.items():
            self.classes.labels(v, str(label)).inc(n)
        for v, obs in p.values.items():
            _observe_many(self.values.labels(v), obs, VALUE_BUCKETS)
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


# -------------------------------------------------------------------------------------- validation
def _bad(msg: str, hint: str | None = None) -> ValidationError:
    return ValidationError(msg, hint=hint)


def _takes(m: LoadedModel) -> str:
    shown = ", ".join(m.features[:8])
    return f"this model takes {len(m.features)} features: {shown}{', ...' if len(m.features) > 8 else ''} (GET /v2/models/{m.name})"


def _check_rows(n: int, max_rows: int) -> None:
    if n == 0:
        raise _bad("no rows to predict", hint="send at least one row")
    if n > max_rows:
        raise PayloadTooLarge(f"{n} rows is more than this server takes ({max_rows})", hint="split the request")


def _finite_check(m: LoadedModel, X: np.ndarray) -> None:
    if X.dtype.kind != "f":
        return
    bad = ~np.isfinite(X)
    if m.allow_nan:
        bad &= ~np.isnan(X)
    if bad.any():
        col = m.features[int(np.argwhere(bad)[0][1])]
        what = "NaN/null or infinite values" if not m.allow_nan else "infinite values"
        raise _bad(f"feature '{col}' has {what}; this model cannot take them",
                   hint="send a finite number for every feature")


def _first_error(m: LoadedModel, rows: list, names: list[str]) -> ValidationError | None:
    """The first offending row or field, or None (slow: numeric models only call it after the fast path failed)."""
    for r, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            return _bad(f"row {r} is {type(row).__name__}, expected a list of {len(names)} values")
        if len(row) != len(names):
            return _bad(f"row {r} has {len(row)} values, expected {len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        for name, v in zip(names, row):
            dt = m.datatypes[m.index[name]]
            if dt in _NUMERIC_OIP:
                if v is None:
                    if m.allow_nan:
                        continue
                    return _bad(f"feature '{name}' in row {r} is null (NaN); this model cannot take missing values",
                                hint=f"send a number ({dt})")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    return _bad(f"feature '{name}' in row {r} is {json.dumps(v)[:40]}, expected a number ({dt})")
            elif not isinstance(v, str) and v is not None:
                return _bad(f"feature '{name}' in row {r} is {json.dumps(v)[:40]}, expected a string ({dt})")
    return None


def _invalid(m: LoadedModel, rows: list, names: list[str]) -> ValidationError:
    return _first_error(m, rows, names) or _bad("rows are not a table of numbers", hint="send one list of values per row")


def to_matrix(m: LoadedModel, rows: list, names: list[str], max_rows: int):
    """Rows of values in ``names`` order -> what the model takes, in signature order."""
    if not isinstance(rows, list):
        raise _bad(f"expected a list of rows, got {type(rows).__name__}")
    _check_rows(len(rows), max_rows)
    unknown = [] if names is m.features or names == m.features else [n for n in names if n not in m.index]
    if unknown:
        raise _bad(f"unknown feature '{unknown[0]}'", hint=_takes(m))
    given = set(names)
    if len(given) != len(names):
        raise _bad("a feature is given twice")
    missing = [f for f in m.features if f not in given]
    if missing:
        raise _bad(f"missing feature '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                   hint=_takes(m))
    if m.numeric:
        try:
            X = np.asarray(rows)
        except ValueError:  # ragged
            raise _invalid(m, rows, names) from None
        if X.ndim != 2 or X.shape[1] != len(names) or X.dtype.kind not in "fiu":
            # slow path: name the offending field; only nulls for a NaN-tolerant model get through
            err = _first_error(m, rows, names)
            if err is not None or not m.allow_nan:
                raise err or _bad("rows are not a table of numbers", hint="send one list of values per row")
            X = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
        X = X.astype(np.float64, copy=False)
        if names != m.features:
            X = X[:, [names.index(f) for f in m.features]]
        _finite_check(m, X)
        return X
    import pandas as pd
    err = _first_error(m, rows, names)
    if err is not None:
        raise err
    frame = pd.DataFrame(rows, columns=names)[m.features]
    for f, dt in zip(m.features, m.datatypes):
        if dt in _NUMERIC_OIP:
            frame[f] = frame[f].astype(np.float64)
            if not m.allow_nan and frame[f].isna().any():
                raise _bad(f"feature '{f}' has null values; this model cannot take them")
    return frame


def columns_to_matrix(m: LoadedModel, columns: dict, max_rows: int):
    if not isinstance(columns, dict):
        raise _bad("expected an object mapping feature names to lists of values")
    names = list(columns)
    lengths = set()
    for n, v in columns.items():
        if not isinstance(v, list):
            columns[n] = v = [v]
        lengths.add(len(v))
    if len(lengths) > 1:
        raise _bad(f"features have different numbers of values ({sorted(lengths)})", hint="send one value per row for every feature")
    return to_matrix(m, [list(r) for r in zip(*columns.values())], names, max_rows)


def records_to_matrix(m: LoadedModel, records: list, max_rows: int):
    if not isinstance(records, list):
        raise _bad(f"expected a list of records, got {type(records).__name__}")
    _check_rows(len(records), max_rows)
    rows = []
    names = m.features
    fset = set(names)
    for r, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _bad(f"record {r} is {type(rec).__name__}, expected an object of feature: value")
        if rec.keys() != fset:
            extra = [k for k in rec if k not in fset]
            if extra:
                raise _bad(f"unknown feature '{extra[0]}' in record {r}", hint=_takes(m))
            missing = [f for f in names if f not in rec]
            raise _bad(f"missing feature '{missing[0]}' in record {r}", hint=_takes(m))
        rows.append([rec[f] for f in names])
    return to_matrix(m, rows, names, max_rows)


def parse_invocations(m: LoadedModel, content_type: str, body: bytes, max_rows: int):
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "text/csv":
        import pandas as pd
        try:
            frame = pd.read_csv(io.BytesIO(body))
        except Exception as exc:
            raise _bad(f"cannot parse CSV: {str(exc).splitlines()[0]}") from None
        frame = frame.astype(object).where(frame.notna(), None)
        return to_matrix(m, frame.values.tolist(), [str(c) for c in frame.columns], max_rows)
    if ctype != "application/json":
        raise UnsupportedMediaType(f"content type {content_type or '(none)'!r} is not supported",
                                   hint="send application/json or text/csv")
    doc = _json(body)
    if not isinstance(doc, dict):
        raise _bad("the JSON body must be an object with one of dataframe_split, dataframe_records, instances, inputs")
    keys = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in doc]
    if len(keys) != 1:
        raise _bad("the JSON body must have exactly one of dataframe_split, dataframe_records, instances, inputs"
                   + (f" (got {', '.join(keys)})" if keys else ""),
                   hint='e.g. {"dataframe_split": {"columns": [...], "data": [[...]]}}')
    unknown = set(doc) - {keys[0], "params"}
    if unknown:
        raise _bad(f"unknown top-level key '{sorted(unknown)[0]}'")
    payload = doc[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(payload, dict) or "data" not in payload:
            raise _bad("dataframe_split must be an object with 'columns' and 'data'")
        columns = payload.get("columns", m.features)
        if columns != m.features and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
            raise _bad("dataframe_split.columns must be a list of feature names")
        return to_matrix(m, payload["data"], columns, max_rows)
    if keys[0] == "dataframe_records":
        return records_to_matrix(m, payload, max_rows)
    if isinstance(payload, dict):  # inputs/instances as columns
        return columns_to_matrix(m, dict(payload), max_rows)
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        return records_to_matrix(m, payload, max_rows)
    return to_matrix(m, payload, m.features, max_rows)


def _json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"body is not valid JSON: {exc}") from None


def parse_infer(m: LoadedModel, body: bytes, header_length: str | None, max_rows: int):
    """Open Inference Protocol v2 request -> (matrix, requested output names, request id)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
            if not 0 < n <= len(body):
                raise ValueError
        except ValueError:
            raise _bad("Inference-Header-Content-Length is not a length within the body") from None
        body, binary = body[:n], body[n:]
    doc = _json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("an infer request is an object with a non-empty 'inputs' list",
                   hint='e.g. {"inputs": [{"name": "...", "shape": [1], "datatype": "FP64", "data": [1.0]}]}')
    offset = 0
    tensors = []
    for i, t in enumerate(doc["inputs"]):
        if not isinstance(t, dict):
            raise _bad(f"inputs[{i}] must be an object")
        name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str):
            raise _bad(f"inputs[{i}].name must be a string")
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise _bad(f"input '{name}': shape must be a list of non-negative integers")
        if not isinstance(datatype, str) or (datatype not in _OIP_NP and datatype != "BYTES"):
            raise _bad(f"input '{name}': unknown datatype {datatype!r}", hint=f"use one of {', '.join(sorted(_OIP_NP))} or BYTES")
        count = math.prod(shape)
        if count > max_rows * max(len(m.features), 1):
            raise PayloadTooLarge(f"input '{name}' has {count} values, more than this server takes")
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"input '{name}': parameters must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if datatype == "BYTES" or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _bad(f"input '{name}': binary_data_size does not match the binary part of the body")
            dt = np.dtype(_OIP_NP[datatype]).newbyteorder("<")
            if size != count * dt.itemsize:
                raise _bad(f"input '{name}': {size} bytes do not hold shape {shape} of {datatype}")
            arr = np.frombuffer(binary[offset:offset + size], dtype=dt).reshape(shape)
            offset += size
        else:
            if "data" not in t:
                raise _bad(f"input '{name}' has no 'data'")
            data = t["data"]
            if not isinstance(data, list):
                data = [data]
            if datatype == "BYTES":
                arr = np.asarray(data, dtype=object)
            else:
                try:
                    flat = np.asarray(data, dtype=np.float64 if datatype.startswith("FP") else None)
                except (ValueError, TypeError):
                    raise _bad(f"input '{name}': data must be numbers for {datatype}") from None
                if flat.dtype.kind not in "fiub":
                    raise _bad(f"input '{name}': data must be numbers for {datatype}")
                if flat.size != count:
                    raise _bad(f"input '{name}': {flat.size} values do not fit shape {shape}")
                arr = flat.reshape(shape)
        tensors.append((name, datatype, arr))
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in doc["outputs"]):
            raise _bad("'outputs' must be a list of objects with a 'name'")
        outputs = [o["name"] for o in doc["outputs"]]
        allowed = {"predict", "predict_proba"} if m.kind == "classification" else {"predict"}
        bad = [o for o in outputs if o not in allowed]
        if bad:
            raise _bad(f"unknown output '{bad[0]}'", hint=f"this model has: {', '.join(sorted(allowed))}")
    request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    # one 2-D tensor holding every feature, or one tensor per feature
    if len(tensors) == 1 and tensors[0][0] not in m.index:
        name, datatype, arr = tensors[0]
        if arr.ndim != 2 or arr.shape[1] != len(m.features):
            raise _bad(f"input '{name}' is not a feature name, so it must be a 2-D tensor [rows, {len(m.features)}]; "
                       f"got shape {list(arr.shape)}", hint=f"or send one tensor per feature: {', '.join(m.features[:5])}, ...")
        _check_rows(arr.shape[0], max_rows)
        if m.numeric:
            if datatype == "BYTES":
                raise _bad(f"input '{name}': BYTES given, this model takes numbers")
            X = arr.astype(np.float64)
            _finite_check(m, X)
            return X, outputs, request_id
        return to_matrix(m, arr.tolist(), m.features, max_rows), outputs, request_id
    columns = {}
    for name, datatype, arr in tensors:
        if name not in m.index:
            raise _bad(f"unknown input '{name}'", hint=_takes(m))
        expected = m.datatypes[m.index[name]]
        if (expected in _NUMERIC_OIP) != (datatype in _NUMERIC_OIP):
            raise _bad(f"input '{name}' has datatype {datatype}, expected {expected}")
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise _bad(f"input '{name}' must have shape [rows] or [rows, 1], got {list(arr.shape)}")
        columns[name] = arr
    missing = [f for f in m.features if f not in columns]
    if missing:
        raise _bad(f"missing input '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                   hint=_takes(m))
    lengths = {len(a) for a in columns.values()}
    if len(lengths) != 1:
        raise _bad(f"inputs have different numbers of rows ({sorted(lengths)})")
    _check_rows(lengths.pop(), max_rows)
    if m.numeric:
        X = np.column_stack([columns[f].astype(np.float64) for f in m.features])
        _finite_check(m, X)
        return X, outputs, request_id
    rows = [list(r) for r in zip(*[columns[f].tolist() for f in m.features])]
    return to_matrix(m, rows, m.features, max_rows), outputs, request_id


# ------------------------------------------------------------------------------------- the app
def openapi(m: LoadedModel | None) -> dict:
    props = {}
    for f, dt in zip(m.features if m else [], m.datatypes if m else []):
        props[f] = {"type": "number"} if dt in _NUMERIC_OIP else {"type": "string"}
    value = {"oneOf": [{"type": "number"}, {"type": "string"}]}
    err = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    title = f"{m.name} v{m.version}" if m else "mlpipe model server"
    name = m.name if m else "{model}"
    invocations = {"oneOf": [
        {"type": "object", "required": ["dataframe_split"], "properties": {"dataframe_split": {
            "type": "object", "required": ["columns", "data"],
            "properties": {"columns": {"type": "array", "items": {"type": "string", "enum": list(props)}},
                           "data": {"type": "array", "items": {"type": "array", "items": value}}}}}},
        {"type": "object", "required": ["dataframe_records"], "properties": {"dataframe_records": {
            "type": "array", "items": {"$ref": "#/components/schemas/Record"}}}},
        {"type": "object", "required": ["instances"], "properties": {"instances": {"type": "array"}}},
        {"type": "object", "required": ["inputs"], "properties": {"inputs": {"oneOf": [{"type": "object"}, {"type": "array"}]}}},
    ]}
    tensor = {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": sorted(_OIP_NP) + ["BYTES"]}, "data": {"type": "array"},
        "parameters": {"type": "object"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": __version__,
                 "description": "REST API generated by mlpipe from the model's manifest."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Record": {"type": "object", "properties": props, "required": list(props), "additionalProperties": False},
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
                "Tensor": tensor,
                "Feedback": {"type": "object", "required": ["request_id", "label"], "properties": {
                    "request_id": {"type": "string"}, "label": value, "row": {"type": "integer", "minimum": 0}}},
                "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"}, "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                    "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "enum": ["predict", "predict_proba"]}}}}}},
            }},
        "paths": {
            "/invocations": {"post": {"summary": "MLflow scoring protocol", "security": [{"bearer": []}],
                                      "requestBody": {"required": True, "content": {
                                          "application/json": {"schema": invocations},
                                          "text/csv": {"schema": {"type": "string"}}}},
                                      "responses": {"200": {"description": "predictions", "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {"predictions": {"type": "array"}}}}}},
                                          "400": err, "401": err, "413": err, "415": err}}},
            f"/v2/models/{name}/infer": {"post": {"summary": "Open Inference Protocol v2 inference", "security": [{"bearer": []}],
                                                  "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}}},
                                                  "responses": {"200": {"description": "outputs"}, "400": err, "401": err, "413": err}}},
            f"/v2/models/{name}": {"get": {"summary": "model metadata", "security": [{"bearer": []}], "responses": {"200": {"description": "metadata"}}}},
            f"/v2/models/{name}/ready": {"get": {"summary": "model readiness", "security": [{"bearer": []}], "responses": {"200": {"description": "ready"}}}},
            "/v2": {"get": {"summary": "server metadata", "security": [{"bearer": []}], "responses": {"200": {"description": "server"}}}},
            "/v2/health/live": {"get": {"summary": "liveness", "responses": {"200": {"description": "live"}}}},
            "/v2/health/ready": {"get": {"summary": "readiness", "responses": {"200": {"description": "ready"}, "503": err}}},
            "/ping": {"get": {"summary": "MLflow health", "responses": {"200": {"description": "ok"}}}},
            "/version": {"get": {"summary": "server version", "security": [{"bearer": []}], "responses": {"200": {"description": "version"}}}},
            "/metadata": {"get": {"summary": "the served version's manifest", "security": [{"bearer": []}], "responses": {"200": {"description": "manifest"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "metrics"}}}},
            "/feedback": {"post": {"summary": "true labels for earlier predictions, by the request id they answered with",
                                   "security": [{"bearer": []}],
                                   "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                                       {"$ref": "#/components/schemas/Feedback"},
                                       {"type": "array", "items": {"$ref": "#/components/schemas/Feedback"}}]}}}},
                                   "responses": {"200": {"description": "stored"}, "400": err, "401": err, "503": err}}},
        },
    }


PUBLIC = {"/v2/health/live", "/v2/health/ready", "/ping", "/health", "/metrics"}


def create_app(config: dict | None = None):
    from flask import Flask, Response, request
    from werkzeug.exceptions import HTTPException

    cfg = load_config(config)
    app = Flask("mlpipe")
    app.config["MAX_CONTENT_LENGTH"] = cfg["max_body_bytes"]
    slot = ModelSlot(Path(cfg["model_dir"]), cfg["require_onnx"])
    slot.load()
    app.extensions["mlpipe"] = slot
    tokens = [t.encode() for t in cfg["auth_tokens"]]
    max_rows = cfg["max_rows"]
    mx = metrics()
    cap = Capture(cfg)
    mx.capture_source = cap

    def model() -> LoadedModel:
        if slot.model is None:
            raise NotReady(f"no model is loaded: {slot.error}",
                           hint=None if hostdir.current(slot.model_dir) is None else
                           "every candidate version was refused (above): pull and activate a good version, then reload")
        return slot.model

    def json_response(obj, status=200, headers=None):
        resp = Response(json.dumps(obj, default=_np_default), status=status, mimetype="application/json")
        if headers:
            resp.headers.update(headers)
        if slot.model is not None:
            resp.headers["X-Model-Version"] = slot.model.version_label
        return resp

    @app.errorhandler(MlpipeError)
    def _mlpipe_error(exc: MlpipeError):
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
        if "mlpipe.request_id" in request.environ:
            headers["X-Request-Id"] = request.environ["mlpipe.request_id"]
        return json_response({"error": str(exc)}, exc.http_status, headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        msg = {413: f"request body is larger than {cfg['max_body_bytes']} bytes; split the request",
               404: f"no such endpoint {request.path}; see /openapi.json",
               405: f"method {request.method} is not allowed on {request.path}"}.get(exc.code, exc.description)
        return json_response({"error": msg}, exc.code)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # a bug: log it, do not leak it
        log.exception("unexpected error on %s", request.path)
        return json_response({"error": "internal error; see the server log"}, 500)

    # --- health and server metadata
    @app.get("/v2/health/live")
    def live():
        return json_response({"live": True})

    @app.get("/v2/health/ready")
    @app.get("/health")
    def ready():
        if slot.model is None:
            return json_response({"ready": False, "error": slot.error}, 503)
        return json_response({"ready": True, "model": slot.model.name, "version": slot.model.version})

    @app.get("/ping")
    def ping():
        return ("\n", 200) if slot.model is not None else json_response({"error": slot.error}, 503)

    @app.get("/version")
    def version():
        return Response(__version__, mimetype="text/plain")

    @app.get("/v2")
    def server_meta():
        return json_response({"name": "mlpipe", "version": __version__, "extensions": ["binary_tensor_data"]})

    def _model_for(name: str, version: str | None = None) -> LoadedModel:
        m = model()
        if name != m.name:
            raise NotFound(f"unknown model '{name}'", hint=f"this server serves '{m.name}'")
        if version is not None and version != m.version_label:
            raise NotFound(f"model '{name}' version {version} is not served here", hint=f"this server serves version {m.version}")
        return m

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    def model_meta(name, version=None):
        m = _model_for(name, version)
        outputs = [{"name": "predict", "datatype": m.target_datatype, "shape": [-1]}]
        if m.kind == "classification":
            outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(m.classes)]})
        return json_response({"name": m.name, "versions": [m.version_label],
                              "platform": "onnxruntime_onnx" if m.runtime == "onnxruntime" else "sklearn",
                              "inputs": [{"name": f, "datatype": d, "shape": [-1]} for f, d in zip(m.features, m.datatypes)],
                              "outputs": outputs,
                              "parameters": {"classes": m.classes, "kind": m.kind}})

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def model_ready(name, version=None):
        m = _model_for(name, version)
        return json_response({"name": m.name, "ready": True})

    def infer_core(name: str, version: str | None, body: bytes, header_length: str | None, rid: str,
                   t0: float) -> dict:
        m = _model_for(name, version)
        X, outputs, oip_id = parse_infer(m, body, header_length, max_rows)
        want_proba = outputs is not None and "predict_proba" in outputs
        labels, probs = m.predict(X, proba=want_proba)
        mx.predictions(m, labels)
        cap.offer(m, rid, X, labels, t0)
        out = []
        if outputs is None or "predict" in outputs:
            labels_list = np.asarray(labels).tolist()
            out.append({"name": "predict", "datatype": m.target_datatype if m.kind == "classification" else "FP64",
                        "shape": [len(labels_list)], "data": labels_list})
        if want_proba and probs is not None:
            p = np.asarray(probs, dtype=np.float64)
            out.append({"name": "predict_proba", "datatype": "FP64", "shape": list(p.shape), "data": p.ravel().tolist()})
        # OIP's own "id" echoes the client's; request_id is what POST /feedback takes
        return {"model_name": m.name, "model_version": m.version_label, "id": rid if oip_id is None else oip_id,
                "request_id": rid, "outputs": out}

    def invocations_core(content_type: str, body: bytes, rid: str, t0: float) -> dict:
        m = model()
        X = parse_invocations(m, content_type, body, max_rows)
        labels, _ = m.predict(X)
        mx.predictions(m, labels)
        cap.offer(m, rid, X, labels, t0)
        return {"predictions": np.asarray(labels).tolist(), "model_version": m.version_label, "request_id": rid}

    def _t0() -> float | None:
        return None if request.headers.get("X-Mlpipe-Capture", "").lower() == "off" else time.perf_counter()

    def _rid() -> str:
        rid = request.environ.get("mlpipe.request_id")
        if rid is None:
            rid = request.environ["mlpipe.request_id"] = request_id(request.headers.get("X-Request-Id"))
        return rid

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    def infer(name, version=None):
        t0, rid = _t0(), _rid()
        return json_response(infer_core(name, version, request.get_data(cache=False),
                                        request.headers.get("Inference-Header-Content-Length"), rid, t0),
                             headers={"X-Request-Id": rid})

    @app.post("/invocations")
    def invocations():
        t0, rid = _t0(), _rid()
        return json_response(invocations_core(request.environ.get("CONTENT_TYPE", ""), request.get_data(cache=False),
                                              rid, t0), headers={"X-Request-Id": rid})

    @app.post("/feedback")
    def feedback():
        if not request.is_json and request.mimetype not in ("", "application/json"):
            raise UnsupportedMediaType(f"POST /feedback takes application/json, got {request.mimetype}",
                                       hint='send {"request_id": "...", "label": ...} or a list of those')
        doc = _json(request.get_data(cache=False))
        items = parse_feedback(doc)
        name = (doc.get("model") if isinstance(doc, dict) else None) or model().name
        from mlpipe.registry import check_name
        try:
            check_name(name)
        except MlpipeError as exc:
            raise _bad(str(exc)) from None
        try:
            result = cap.store().attach_labels(name, items, source="http")
        except NotReady as exc:
            raise NotReady(f"the labels were not stored: {exc.message}", hint=exc.hint) from None
        except MlpipeError:
            raise
        except Exception as exc:
            log.error("POST /feedback: the capture database failed: %s", exc)
            raise NotReady("the capture database is unavailable; the labels were not stored",
                           hint="send them again later, or load them with mlpipe feedback load MODEL FILE") from None
        return json_response({"model": name, **result})

    @app.get("/metadata")
    def metadata():
        m = model()
        man = {k: v for k, v in m.manifest.items() if k != "spec"}
        return json_response({**man, "runtime": m.runtime, "model_dir": str(slot.model_dir),
                              "loaded_at": m.loaded_at, "load_error": slot.error, "pid": os.getpid()})

    @app.get("/openapi.json")
    def openapi_doc():
        return json_response(openapi(slot.model))

    @app.get("/metrics")
    def prom():
        data, ctype = render_metrics()
        return Response(data, mimetype=ctype.split(";")[0], headers={"Content-Type": ctype})

    app.wsgi_app = Edge(app.wsgi_app, tokens, mx, slot, cfg["max_body_bytes"],
                        {"invocations": invocations_core, "infer": infer_core})
    return app


_FIXED_ROUTES = {"/invocations", "/ping", "/version", "/health", "/metadata", "/openapi.json", "/metrics", "/v2", "/feedback",
                 "/v2/health/live", "/v2/health/ready"}


def route_label(path: str) -> str:
    """A bounded label for a request path (a client must not be able to mint metric series)."""
    if path in _FIXED_ROUTES:
        return path
    if path.startswith("/v2/models/"):
        versioned = "/versions/" in path
        base = "/v2/models/<name>" + ("/versions/<version>" if versioned else "")
        if path.endswith("/infer"):
            return base + "/infer"
        if path.endswith("/ready"):
            return base + "/ready"
        return base
    return "unmatched"


class Edge:
    """WSGI middleware in front of Flask: bearer-token check, request metrics, and the two prediction
    endpoints, served here without Flask's per-request context, routing and response objects (they
    are the hot path; every other route goes through Flask). The Flask routes for the same endpoints
    call the same core functions."""

    def __init__(self, app, tokens: list[bytes], mx: "_Metrics", slot: "ModelSlot", max_body: int, cores: dict):
        self.app, self.tokens, self.mx, self.slot, self.max_body, self.cores = app, tokens, mx, slot, max_body, cores

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        path = environ.get("PATH_INFO", "")
        status_seen = []

        def sr(status, headers, exc_info=None):
            status_seen.append(status)
            return start_response(status, headers, exc_info)

        if self.tokens and path not in PUBLIC and not self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
            result = self._respond(sr, 401, {"error": str(Unauthorized("missing or wrong bearer token",
                                                                       hint="send Authorization: Bearer <token>"))},
                                   [("WWW-Authenticate", "Bearer")])
        elif environ.get("REQUEST_METHOD") == "POST" and environ.get("CONTENT_LENGTH") and (
                path == "/invocations" or (path.startswith("/v2/models/") and path.endswith("/infer"))):
            result = self._predict(environ, sr, path,
                                   None if environ.get("HTTP_X_MLPIPE_CAPTURE", "").lower() == "off" else t0)
        else:
            result = self.app(environ, sr)
        if path != "/metrics" and status_seen:
            self.mx.request(route_label(path), int(status_seen[0][:3]), time.perf_counter() - t0)
        return result

    def _predict(self, environ, sr, path: str, t0: float):
        rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        extra = [("X-Request-Id", rid)]
        try:
            length = int(environ["CONTENT_LENGTH"])
        except ValueError:
            return self._respond(sr, 400, {"error": "Content-Length is not a number"}, extra)
        try:
            if length > self.max_body:
                raise PayloadTooLarge(f"request body is larger than {self.max_body} bytes; split the request")
            body = environ["wsgi.input"].read(length) if length > 0 else b""
            if path == "/invocations":
                doc = self.cores["invocations"](environ.get("CONTENT_TYPE", ""), body, rid, t0)
            else:
                parts = path.split("/")  # '', v2, models, NAME, [versions, V,] infer
                if len(parts) == 5:
                    name, version = parts[3], None
                elif len(parts) == 7 and parts[4] == "versions":
                    name, version = parts[3], parts[5]
                else:
                    raise NotFound(f"no such endpoint {path}; see /openapi.json")
                doc = self.cores["infer"](name, version, body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"),
                                          rid, t0)
            return self._respond(sr, 200, doc, extra)
        except MlpipeError as exc:
            return self._respond(sr, exc.http_status, {"error": str(exc)}, extra)
        except Exception:  # a bug: log it, do not leak it
            log.exception("unexpected error on %s", path)
            return self._respond(sr, 500, {"error": "internal error; see the server log"}, extra)

    def _respond(self, sr, status: int, doc: dict, extra: list | None = None):
        body = json.dumps(doc, default=_np_default).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if self.slot.model is not None:
            headers.append(("X-Model-Version", self.slot.model.version_label))
        sr(f"{status} {HTTPStatus(status).phrase.upper()}", headers + (extra or []))
        return [body]

    def _authorized(self, header: str) -> bool:
        scheme, _, credentials = header.strip().partition(" ")
        given = credentials.strip().encode() if scheme.lower() == "bearer" else b""  # RFC 7235: any case
        ok = False
        for t in self.tokens:  # compare with every token: the time does not depend on which one matched
            ok |= hmac.compare_digest(given, t)
        return ok and bool(given)


def _np_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")
