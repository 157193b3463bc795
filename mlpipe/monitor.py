"""``mlpipe monitor``: what cron runs every few minutes per model. It measures, evaluates the spec's
alerts, tells people, and may start a retrain (the self-healing loop).

    served version  what the endpoints' /metadata report (the most common one), else the spec's
                    ``retrain.promote`` alias, else the latest version
    drift           captured inputs of that version in the window against its ``baseline.json``:
                    population stability index per feature (``drift_<feature>``, ``drift`` = the
                    largest), with scipy.stats' ks_2samp (numeric) or chisquare (categorical) beside
                    it; ``prediction_drift`` for the predictions. A version registered before
                    baselines existed has none: drift is reported as unknown, never guessed
    quality         scikit-learn metrics on the captured predictions of the window that have a
                    feedback label (an alert needs ``min_labelled`` of them), or on ``monitor.source``
                    (a labelled data source) sent through the first endpoint
    serving         p99_ms and error_rate (5xx share) of the prediction routes, from each endpoint's
                    /metrics, over the requests since the previous run (kept in the state; the first
                    run, or a restarted server, counts from the server's start)
    alerts          a breach is a log line, a ledger event (alert_firing / alert_resolved) and, with
                    ``do: [notify]`` and ``notify.webhook``, a JSON POST retried with backoff; an
                    ongoing breach is announced again only every ``notify.repeat``; a cleared one gets
                    a "resolved" notice. A metric that cannot be measured (no labels, no baseline, an
                    endpoint down) leaves its alert as it was
    retrain         ``do: [retrain]`` on a firing alert starts ``mlpipe retrain SPEC --force`` when the
                    model's retraining is not paused, no retrain holds its lock, ``retrain.cooldown``
                    has passed, and the monitor did not start one for this alert within
                    ``notify.repeat``; detached (its output appended to a log file) or, ``wait``, in
                    the foreground with its exit code in the report
    state           <registry>/<model>/monitor/state.json (alert states, the last /metrics scrape),
                    so the trainers that run the monitor share it
    textfile        the figures in Prometheus text format for node-exporter's textfile collector

The report's ``exit_code`` is errors.MONITOR_EXIT: 0 healthy, 14 an alert is firing.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlpipe import baseline as bl
from mlpipe.errors import MONITOR_EXIT, IntegrityError, MlpipeError, NotFound
from mlpipe.spec import (_WHEN_RE, CLASSIFICATION_METRICS, QUALITY_METRICS, Spec, parse_duration)

STATE_FILE = "monitor/state.json"
LOG_DIR_ENV = "MLPIPE_LOG_DIR"
DEFAULT_LOG_DIR = "~/.mlpipe/logs"
MIN_DRIFT_ROWS = 50            # fewer captured rows than this in a window: drift is not measured
KS_SAMPLE = 5000               # live values per feature given to ks_2samp (a fixed-seed sample)
NOTIFY_BACKOFF = 0.5           # seconds before the first retry; doubled for each further one
NOTIFY_MAX_SECONDS = 60.0      # a webhook gets at most this long, retries included, per notice
# captured columns that are not inputs: an input with one of these names is captured as input.<name>
_NOT_INPUTS = ("request_id", "row", "model", "version", "host", "ts", "latency_ms", "prediction", "label")
PREDICT_ROUTES = {"/invocations", "/models/<name>/invocations", "/v2/models/<name>/infer",
                  "/v2/models/<name>/versions/<version>/infer"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hm(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _clean(obj):
    """JSON-safe: NaN and infinities become None, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def redact_url(url: str | None) -> str | None:
    """A webhook URL as logs and the ledger show it: no credentials, no query, at most the first path
    segment (chat webhooks carry their secret in the path)."""
    if not url:
        return url
    from urllib.parse import urlsplit
    u = urlsplit(url)
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    parts = [p for p in u.path.split("/") if p]
    path = "/" + parts[0] + ("/…" if len(parts) > 1 else "") if parts else ""
    return f"{u.scheme}://{host}{path}"


# ------------------------------------------------------------------------------------------ state
def _state_key(name: str) -> str:
    from mlpipe.registry import check_name
    return f"{check_name(name)}/{STATE_FILE}"


def load_state(reg, name: str) -> dict:
    try:
        state = reg.store.get_json(_state_key(name))
    except KeyError:
        state = {}
    except IntegrityError:  # a damaged state file costs the memory of past notices, not the run
        state = {}
    state.setdefault("alerts", {})
    state.setdefault("scrapes", {})
    return state


def save_state(reg, name: str, state: dict) -> None:
    reg.store.put(_state_key(name), json.dumps(_clean(state), sort_keys=True, indent=1).encode())


# -------------------------------------------------------------------------------------- baseline
def load_baseline(reg, name: str, version: int, manifest: dict) -> tuple[dict | None, str | None]:
    """(baseline, None), or (None, why there is none) for a version registered before baselines."""
    info = manifest.get("baseline") or {}
    fname = info.get("file")
    if not fname or fname not in (manifest.get("files") or {}):
        return None, (f"no baseline: v{version} was registered before mlpipe kept baseline statistics, so drift "
                      f"is not measured (retrain or train a new version to get one)")
    with tempfile.TemporaryDirectory(prefix="mlpipe-monitor-") as tmp:
        path, _ = reg.pull_file(f"{name}:{version}", fname, tmp)  # sha256-verified against the manifest
        try:
            return bl.from_bytes(path.read_bytes()), None
        except ValueError as exc:
            return None, f"the baseline of v{version} cannot be read ({exc}); drift is not measured"


# ----------------------------------------------------------------------------------------- drift
def feature_drift(stat: dict, values) -> dict:
    """PSI and a scipy.stats test of one feature's live values against its baseline statistics."""
    from scipy import stats
    base, live = bl.live_proportions(stat, values)
    out: dict[str, Any] = {"psi": bl.psi(base, live), "rows": int(len(values))}
    if stat["kind"] == "numeric":
        v = bl._to_float(values)
        v = v[np.isfinite(v)]
        sample = np.asarray(stat.get("sample") or [], dtype=np.float64)
        if v.size and sample.size:
            if v.size > KS_SAMPLE:
                v = np.random.default_rng(bl.SEED).choice(v, size=KS_SAMPLE, replace=False)
            res = stats.ks_2samp(sample, v)
            out.update(test="ks_2samp", statistic=float(res.statistic), p_value=float(res.pvalue))
    else:
        n = len(values)
        expected = np.clip(base, bl.EPS, None)
        expected = expected / expected.sum() * n
        observed = live * n
        if n and base.size > 1:
            res = stats.chisquare(observed, expected)
            out.update(test="chisquare", statistic=float(res.statistic), p_value=float(res.pvalue))
    return out


def drift(frame, base: dict) -> tuple[dict, dict, list[str]]:
    """(values, per-feature detail, notes) for the captured rows ``frame``."""
    values: dict[str, float] = {}
    detail: dict[str, dict] = {}
    notes: list[str] = []
    for feature, stat in base["features"].items():
        column = f"input.{feature}" if feature in _NOT_INPUTS else feature  # how capture.Store names it
        if column not in frame.columns:
            notes.append(f"captured rows have no input '{feature}'")
            continue
        d = feature_drift(stat, frame[column])
        detail[feature] = d
        values[f"drift_{feature}"] = d["psi"]
    if detail:
        worst = max(detail, key=lambda f: detail[f]["psi"])
        values["drift"] = detail[worst]["psi"]
        values["drift_feature"] = worst
    if base.get("prediction") and "prediction" in frame.columns:
        stat = base["prediction"]
        d = feature_drift(stat, frame["prediction"])
        detail["<prediction>"] = d
        values["prediction_drift"] = d["psi"]
    return values, detail, notes


# --------------------------------------------------------------------------------------- quality
def _aligned(y_true, y_pred):
    """Labels and predictions as one comparable type: numbers when both are all numbers (1 == 1.0),
    else strings."""
    import pandas as pd
    t = pd.Series(list(y_true), dtype=object)
    p = pd.Series(list(y_pred), dtype=object)
    tn, pn = pd.to_numeric(t, errors="coerce"), pd.to_numeric(p, errors="coerce")
    if tn.notna().all() and pn.notna().all():
        return tn.to_numpy(dtype=np.float64), pn.to_numpy(dtype=np.float64)
    return t.astype(str).to_numpy(), p.astype(str).to_numpy()


def quality(metric: str, y_true, y_pred, scores=None) -> float:
    """One quality metric (scikit-learn's); ``scores`` (the positive class's probability) only for roc_auc.
    Raises ValueError saying why it cannot be computed."""
    from sklearn import metrics as skm
    t, p = _aligned(y_true, y_pred)
    if metric == "roc_auc":
        if scores is None:
            raise ValueError("roc_auc needs predicted probabilities, which captured predictions do not carry; "
                             "use monitor.source (scored through the endpoint) or another metric")
        return float(skm.roc_auc_score(t, scores))
    if metric in ("r2", "rmse", "mae", "mse"):
        if t.dtype.kind != "f":
            raise ValueError(f"{metric} needs numeric labels and predictions")
        fn = {"r2": skm.r2_score, "rmse": skm.root_mean_squared_error, "mae": skm.mean_absolute_error,
              "mse": skm.mean_squared_error}[metric]
        return float(fn(t, p))
    if metric == "accuracy":
        return float(skm.accuracy_score(t, p))
    if metric == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(t, p))
    base, _, average = metric.partition("_")
    fn = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[base]
    return float(fn(t, p, average=average or "binary", zero_division=0))


def _quality_metrics(alerts: list, kind: str) -> list[str]:
    wanted = [a["metric"] for a in alerts if a["metric"] in QUALITY_METRICS]
    default = "accuracy" if kind == "classification" else "r2"
    return list(dict.fromkeys([default] + wanted))


def measure_quality(names: list[str], y_true, y_pred, scores=None) -> tuple[dict, dict]:
    values, errors = {}, {}
    for m in names:
        try:
            values[m] = quality(m, y_true, y_pred, scores)
        except (ValueError, TypeError) as exc:
            errors[m] = str(exc).splitlines()[0]
    return values, errors


def source_quality(url: str, name: str, manifest: dict, source: str, names: list[str], token: str | None,
                   timeout: float) -> tuple[dict, dict, int, str]:
    """Quality on a labelled data source sent through a live endpoint (evaluate's remote estimator)."""
    import requests

    from mlpipe import evaluate as ev
    session = requests.Session()
    session.headers["X-Mlpipe-Capture"] = "off"  # the monitor's own rows must not pass for live traffic
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    base = url.rstrip("/")
    try:
        meta = session.get(f"{base}/v2/models/{name}", timeout=timeout)
    except requests.RequestException as exc:
        raise MlpipeError(f"{base} is unreachable ({type(exc).__name__})") from None
    if meta.status_code != 200:
        raise MlpipeError(f"{base}/v2/models/{name} answered {meta.status_code}: {meta.text[:200]}")
    ds, X, y = ev.frame_for(manifest, source)
    remote = ev._Remote(session, base, name, meta.json(), 200, timeout, [])
    pred = remote.predict(X)
    scores = None
    if "roc_auc" in names and remote.kind == "classification" and len(remote.classes_) == 2:
        scores = remote.predict_proba(X)[:, 1]
    values, errors = measure_quality(names, y, pred, scores)
    return values, errors, int(len(X)), ds.source


# --------------------------------------------------------------------------------------- serving
def scrape(url: str, token: str | None, timeout: float, model: str | None = None) -> dict:
    """The cumulative prediction-route figures of one endpoint's /metrics: latency histogram buckets
    (le -> count, summed over the routes), requests and 5xx answers; and /metadata's model and version.
    With ``model``, that model's series only (a multi-model host serves others beside it)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = url.rstrip("/")
    out: dict[str, Any] = {"buckets": {}, "requests": 0.0, "errors": 0.0}
    r = requests.get(f"{base}/metrics", timeout=timeout)
    r.raise_for_status()
    def mine(labels: dict) -> bool:  # a server from before the model label counts as this model's
        return model is None or labels.get("model", model) == model

    for family in text_string_to_metric_families(r.text):
        if family.name == "mlpipe_request_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket") and s.labels.get("endpoint") in PREDICT_ROUTES and mine(s.labels):
                    le = s.labels["le"]
                    out["buckets"][le] = out["buckets"].get(le, 0.0) + s.value
        elif family.name in ("mlpipe_requests", "mlpipe_requests_total"):
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("endpoint") in PREDICT_ROUTES and mine(s.labels):
                    out["requests"] += s.value
                    if str(s.labels.get("status", "")).startswith("5"):
                        out["errors"] += s.value
    try:
        meta = requests.get(f"{base}/models/{model}/metadata" if model else f"{base}/metadata", headers=headers,
                            timeout=timeout)
        if meta.status_code == 200:
            doc = meta.json()
            out["model"], out["version"] = doc.get("name"), doc.get("version")
    except (requests.RequestException, ValueError):
        pass
    return out


def delta(now: dict, before: dict | None) -> tuple[dict, bool]:
    """(now - before, True) when ``before`` is an earlier scrape of the same server; (now, False) on the
    first run or after a restart (a counter went down)."""
    if not before:
        return now, False
    b = before.get("buckets") or {}
    if now["requests"] < before.get("requests", 0) or any(now["buckets"].get(k, 0) < v for k, v in b.items()):
        return now, False
    return {"buckets": {k: v - b.get(k, 0.0) for k, v in now["buckets"].items()},
            "requests": now["requests"] - before.get("requests", 0.0),
            "errors": max(now["errors"] - before.get("errors", 0.0), 0.0)}, True


def histogram_quantile(q: float, buckets: dict) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``le -> count`` buckets (linear within a bucket;
    the +Inf bucket answers with the highest finite bound). None without observations."""
    items = sorted(((float(le), c) for le, c in buckets.items()), key=lambda t: t[0])
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in items:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def serving(endpoints: list[str], state: dict, token: str | None, timeout: float, now: float,
            model: str | None = None) -> dict:
    """p99_ms and error_rate over every endpoint, each endpoint's figures, and the versions they serve."""
    total = {"buckets": {}, "requests": 0.0, "errors": 0.0}
    per: dict[str, dict] = {}
    for url in endpoints:
        try:
            cur = scrape(url, token, timeout, model)
        except Exception as exc:
            per[url] = {"up": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        d, since_last = delta(cur, state["scrapes"].get(url))
        state["scrapes"][url] = {"buckets": cur["buckets"], "requests": cur["requests"], "errors": cur["errors"],
                                 "at": now}
        p99 = histogram_quantile(0.99, d["buckets"])
        per[url] = {"up": True, "model": cur.get("model"), "version": cur.get("version"), "requests": d["requests"],
                    "errors": d["errors"], "p99_ms": None if p99 is None else p99 * 1000,
                    "since": "previous run" if since_last else "server start"}
        for k, v in d["buckets"].items():
            total["buckets"][k] = total["buckets"].get(k, 0.0) + v
        total["requests"] += d["requests"]
        total["errors"] += d["errors"]
    p99 = histogram_quantile(0.99, total["buckets"])
    values = {}
    if p99 is not None:
        values["p99_ms"] = p99 * 1000
    if total["requests"] > 0:
        values["error_rate"] = total["errors"] / total["requests"]
    return {"values": values, "endpoints": per, "requests": total["requests"]}


# ---------------------------------------------------------------------------------------- notify
def send(webhook: str, payload: dict, timeout: float = 5, retries: int = 3,
         max_seconds: float = NOTIFY_MAX_SECONDS) -> dict:
    """POST ``payload`` as JSON; retry connection errors, timeouts, 408, 429 and 5xx with exponential
    backoff (NOTIFY_BACKOFF, doubled each time), within ``max_seconds`` in all. Never raises."""
    import requests
    deadline = time.monotonic() + max_seconds
    error, attempts = None, 0
    for attempt in range(retries + 1):
        attempts += 1
        left = max(deadline - time.monotonic(), 0.1)
        # requests' timeout is per socket read: a receiver that trickles a byte at a time would hold
        # the run (and, under flock, every later cron run) for ever. The POST runs in a daemon thread
        # that gets the time left, no more.
        box: dict = {}

        def post(_box=box, _t=max(min(timeout, left), 0.1)):
            try:
                _box["r"] = requests.post(webhook, json=payload, timeout=_t)
            except Exception as exc:  # noqa: BLE001 - reported below
                _box["exc"] = exc
        t = threading.Thread(target=post, name="mlpipe-webhook", daemon=True)
        t.start()
        t.join(min(timeout, left) + 1.0)
        if t.is_alive():
            error = f"no complete answer within {min(timeout, left):.0f} s"
            if time.monotonic() + NOTIFY_BACKOFF * 2 ** attempt >= deadline:
                break
            continue
        try:
            if "exc" in box:
                raise box["exc"]
            r = box["r"]
            if 200 <= r.status_code < 300:
                return {"ok": True, "attempts": attempts, "status": r.status_code}
            error = f"HTTP {r.status_code}"
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                break  # the receiver refuses this request: retrying will not change its mind
        except requests.RequestException as exc:
            error = type(exc).__name__
        pause = NOTIFY_BACKOFF * 2 ** attempt
        if attempt == retries or time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
    return {"ok": False, "attempts": attempts, "error": error}


# --------------------------------------------------------------------------------------- retrain
def log_dir() -> Path:
    return Path(os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR).expanduser()


def retrain_blocked(spec: Spec, reg) -> str | None:
    """Why the monitor must not start a retrain of the model now, or None. ``retrain --force`` skips
    the cooldown and a pause, so they are checked here."""
    from mlpipe import retrain as rt
    if not Path(spec.path).is_file():
        return f"the spec {spec.path} is not a file mlpipe retrain can read"
    p = rt.paused(reg, spec.name)
    if p is not None:
        return f"retraining is paused by {p.get('by', '?')}" + (f": {p['reason']}" if p.get("reason") else "")
    try:
        held = reg.store.get_json(rt._key(spec.name, "LOCK"))
    except KeyError:
        held = None
    if held is not None:
        dead = held.get("host") == socket.gethostname() and not rt._pid_alive(held.get("pid"))
        if not dead:
            return (f"a retrain is running (pid {held.get('pid', '?')} on {held.get('host', '?')} since "
                    f"{str(held.get('since', '?'))[:19].replace('T', ' ')} UTC)")
    return rt.cooldown(reg, spec.name, spec.retrain["cooldown"])


def start_retrain(spec: Spec, reg, wait: bool, why: str, log: Callable[[str], None]) -> dict:
    """``mlpipe retrain SPEC --force`` for this model: detached (own session, output appended to
    <log dir>/retrain-<model>.log) or, ``wait``, in the foreground (its output also echoed)."""
    cmd = [sys.executable, "-m", "mlpipe", "retrain", str(Path(spec.path).resolve()), "--force"]
    env = {**os.environ, "MLPIPE_REGISTRY": reg.url}
    redis_url = getattr(reg.store, "redis_url", None)
    if redis_url:
        env["MLPIPE_CACHE"] = redis_url
    folder = log_dir()
    path = folder / f"retrain-{spec.name}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _start_retrain(cmd, env, path, wait, why, log)
    except OSError as exc:
        return {"started": False, "log": str(path),
                "blocked": f"not started: cannot write its log {path} ({exc.strerror or exc}); set {LOG_DIR_ENV} "
                           f"(retrain_cron_log_dir) to a folder this user can write"}


def _start_retrain(cmd: list, env: dict, path: Path, wait: bool, why: str, log: Callable[[str], None]) -> dict:
    with open(path, "ab") as f:
        f.write(f"--- {_iso(time.time())} mlpipe monitor: {why} -> {' '.join(cmd[1:])}\n".encode())
        f.flush()
        if not wait:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, close_fds=True)
            return {"started": True, "pid": proc.pid, "log": str(path), "wait": False}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        last = ""
        for raw in proc.stdout:
            f.write(raw)
            line = raw.decode(errors="replace").rstrip()
            if line:
                last = line
                log(f"  | {line}")
        proc.stdout.close()
        code = proc.wait()
    return {"started": True, "pid": proc.pid, "log": str(path), "wait": True, "exit_code": code, "last_line": last}


# ---------------------------------------------------------------------------------------- alerts
def _breach(value: float, op: str, threshold: float) -> bool:
    return {"<": value < threshold, "<=": value <= threshold, ">": value > threshold, ">=": value >= threshold}[op]


def _threshold_text(alert: dict) -> str:
    m = _WHEN_RE.match(alert["when"])
    return m.group("threshold") if m else f"{alert['threshold']:g}"


def describe(metric: str, value: float, figures: dict) -> str:
    if metric in QUALITY_METRICS:
        return f"live {metric} {value:.2f} on {figures.get('labelled', 0)} labelled predictions"
    if metric == "drift":
        return f"drift: {figures['values'].get('drift_feature', '?')} PSI {value:.2f}"
    if metric.startswith("drift_"):
        return f"drift: {metric[len('drift_'):]} PSI {value:.2f}"
    if metric == "prediction_drift":
        return f"prediction drift PSI {value:.2f}"
    if metric == "p99_ms":
        return f"p99 {value:.1f} ms"
    if metric == "error_rate":
        return f"error rate {value:.2%}"
    return f"{metric} {value:g}"  # pragma: no cover


def _lookup(alert: dict, figures: dict, kind: str) -> tuple[float | None, str | None]:
    """(value, None) or (None, why it is not measured) for an alert in its window's figures."""
    metric = alert["metric"]
    values = figures["values"]
    if metric in QUALITY_METRICS:
        if kind == "regression" and metric in CLASSIFICATION_METRICS or \
                kind == "classification" and metric not in CLASSIFICATION_METRICS:
            return None, f"{metric} does not apply to a {kind} model"
        n = figures.get("labelled", 0)
        if n < alert["min_labelled"]:
            return None, f"not enough labels ({n} < {alert['min_labelled']})"
        if metric in figures.get("quality_errors", {}):
            return None, f"{metric} cannot be computed: {figures['quality_errors'][metric]}"
        if metric not in values:
            return None, "no labelled predictions"
        return values[metric], None
    if metric in values:
        return values[metric], None
    if metric.startswith("drift") or metric == "prediction_drift":
        return None, figures.get("drift_note") or f"{metric}: not measured"
    return None, figures.get("serving_note") or f"{metric}: not measured"


# -------------------------------------------------------------------------------------------- run
def served_version(reg, spec: Spec, endpoint_figures: dict) -> tuple[int, str]:
    versions = []
    for url, e in endpoint_figures.items():
        if e.get("up") and e.get("model") == spec.name and e.get("version") is not None:
            try:
                versions.append(int(e["version"]))
            except (TypeError, ValueError):
                pass
    if versions:
        v, n = Counter(versions).most_common(1)[0]
        return v, f"served by {n} of {len(endpoint_figures)} endpoint(s)"
    alias = spec.retrain.get("promote")
    a = reg.alias(spec.name, alias) if alias else None
    if a is not None:
        return int(a["version"]), f"{spec.name}@{alias}"
    return reg.require_model(spec.name)[-1], "latest version"


def _window_frame(store, name: str, version: int, since: float, until: float):
    return store.predictions(name, since=since, until=until, version=version)


LOCK_FILE = "monitor/LOCK"
LOCK_STALE_SECONDS = 1800   # a monitor run takes seconds to minutes: a lock this old is a dead run's


def _lock(reg, name: str, run_id: str) -> None:
    """One monitor run per model across every trainer (cron's flock covers one host only): two at
    once would both notify every alert. A lock whose process is gone on this host, or older than
    LOCK_STALE_SECONDS, is taken over."""

    from mlpipe import retrain as rt
    from mlpipe.errors import Locked
    from mlpipe.registry import Conflict
    key = f"{name}/{LOCK_FILE}"
    body = json.dumps({"run": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
    for attempt in (1, 2):
        try:
            reg.store.put(key, body, exclusive=True)
            return
        except Conflict:
            pass
        try:
            held = reg.store.get_json(key)
        except KeyError:
            continue  # released in between
        dead = held.get("host") == socket.gethostname() and not rt._pid_alive(held.get("pid"))
        if attempt == 2 or not (dead or time.time() - float(held.get("since") or 0) > LOCK_STALE_SECONDS):
            raise Locked(f"another mlpipe monitor of {name} is running (pid {held.get('pid', '?')} on "
                         f"{held.get('host', '?')} since {_hm(float(held.get('since') or 0))} UTC)",
                         hint="it evaluates and notifies the same alerts; this run would notify them twice. "
                              f"A lock older than {LOCK_STALE_SECONDS // 60} minutes is taken over")
        reg.store.delete(key)


def _unlock(reg, name: str, run_id: str) -> None:
    try:
        if reg.store.get_json(f"{name}/{LOCK_FILE}").get("run") == run_id:
            reg.store.delete(f"{name}/{LOCK_FILE}")
    except (KeyError, MlpipeError):
        pass


def run(spec: Spec, reg, store=None, endpoints: list[str] | None = None, *, textfile: str | None = None,
        wait: bool = False, token: str | None = None, timeout: float = 10.0, now: float | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Measure, evaluate the spec's alerts, notify, maybe start a retrain. Returns the report (its
    ``summary`` is what the CLI prints, ``exit_code`` 0 healthy or 14 firing). Raises Locked (exit 8)
    while another monitor of the model runs."""
    run_id = os.urandom(8).hex()
    _lock(reg, spec.name, run_id)
    try:
        return _run(spec, reg, store, endpoints, textfile=textfile, wait=wait, token=token, timeout=timeout, now=now,
                    log=log)
    finally:
        _unlock(reg, spec.name, run_id)


def _missing_sqlite(store) -> str | None:
    """The path of a SQLite capture file that does not exist (a monitor pointed at the wrong
    database would otherwise only ever say "not enough captured rows")."""
    url = getattr(store, "url", None)
    if not url or not str(url).startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url
        path = make_url(str(url)).database
    except Exception:  # noqa: BLE001 - not ours to judge: the store reports its own errors
        return None
    return path if path and path != ":memory:" and not Path(path).exists() else None


def _run(spec: Spec, reg, store=None, endpoints: list[str] | None = None, *, textfile: str | None = None,
         wait: bool = False, token: str | None = None, timeout: float = 10.0, now: float | None = None,
         log: Callable[[str], None] = print) -> dict:
    now = time.time() if now is None else float(now)
    name = spec.name
    endpoints = list(endpoints if endpoints else spec.monitor.get("endpoints") or [])
    state = load_state(reg, name)
    report: dict[str, Any] = {"model": name, "at": _iso(now), "endpoints": {}, "windows": {}, "alerts": [],
                              "actions": [], "notes": []}

    srv = serving(endpoints, state, token, timeout, now, name) if endpoints else {"values": {}, "endpoints": {}, "requests": 0}
    report["endpoints"] = srv["endpoints"]
    for url, e in srv["endpoints"].items():
        if not e.get("up"):
            report["notes"].append(f"{url} unreachable: {e['error']}")
    serving_note = None
    if not endpoints:
        serving_note = "no endpoints (monitor.endpoints or --endpoint)"
    elif not any(e.get("up") for e in srv["endpoints"].values()):
        serving_note = "no endpoint answered /metrics"
    elif not srv["requests"]:
        serving_note = "no prediction requests since the previous run"

    version, why_version = served_version(reg, spec, srv["endpoints"])
    manifest = reg.manifest(name, version)
    kind = ((manifest.get("signature") or {}).get("target") or {}).get("kind", "classification")
    report.update(version=version, version_from=why_version, kind=kind)
    base, no_base = load_baseline(reg, name, version, manifest)
    report["baseline"] = base is not None
    if no_base:
        report["notes"].append(no_base)

    default_window = spec.monitor.get("window") or "1h"
    windows: dict[str, int] = {str(default_window): parse_duration(default_window, "monitor.window")}
    for a in spec.alerts:
        w = str(a.get("window") or default_window)
        windows.setdefault(w, parse_duration(w, "alert window"))

    frame, capture_error = None, None
    missing = _missing_sqlite(store)
    if missing:
        capture_error = (f"no capture database at {missing}: nothing was captured there (point MLPIPE_CAPTURE_DB, "
                         f"retrain_cron_capture_db, at the database the servers write)")
        report["notes"].append(capture_error)
    elif store is not None:
        try:
            frame = _window_frame(store, name, version, now - max(windows.values()), now)
        except Exception as exc:
            capture_error = f"capture database unreachable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            report["notes"].append(capture_error)
    else:
        capture_error = "no capture database"

    src = None
    if spec.monitor.get("source"):
        names = _quality_metrics(spec.alerts, kind)
        up = [u for u in endpoints if srv["endpoints"].get(u, {}).get("up")]
        if not up:
            report["notes"].append("monitor.source is set but no endpoint is up to score it through")
        else:
            try:
                values, errors, rows, shown = source_quality(up[0], name, manifest, spec.monitor["source"], names,
                                                             token, timeout)
                src = {"values": values, "errors": errors, "rows": rows, "source": shown, "endpoint": up[0]}
                report["source"] = src
            except MlpipeError as exc:
                report["notes"].append(f"monitor.source could not be scored: {exc}")

    for label, seconds in windows.items():
        figures: dict[str, Any] = {"seconds": seconds, "values": dict(srv["values"]), "serving_note": serving_note}
        if frame is not None:
            sub = frame[frame["ts"] >= now - seconds] if len(frame) else frame
            figures["rows"] = int(len(sub))
            if base is None:
                figures["drift_note"] = no_base
            elif len(sub) < MIN_DRIFT_ROWS:
                figures["drift_note"] = f"not enough captured rows ({len(sub)} < {MIN_DRIFT_ROWS})"
            else:
                values, detail, notes = drift(sub, base)
                figures["values"].update(values)
                figures["drift"] = detail
                if notes:
                    figures["drift_notes"] = notes
            if src is None:
                lab = sub[sub["label"].notna()] if "label" in sub.columns and len(sub) else sub.iloc[0:0]
                figures["labelled"] = int(len(lab))
                if len(lab):
                    values, errors = measure_quality(_quality_metrics(spec.alerts, kind), lab["label"], lab["prediction"])
                    figures["values"].update(values)
                    figures["quality_errors"] = errors
        else:
            figures["rows"] = 0
            figures["drift_note"] = no_base or capture_error
            figures["labelled"] = 0
        if src is not None:
            figures["values"].update(src["values"])
            figures["quality_errors"] = src["errors"]
            figures["labelled"] = src["rows"]
            figures["quality_on"] = f"{src['source']} through {src['endpoint']}"
        report["windows"][label] = figures

    repeat = parse_duration(spec.notify.get("repeat") or "1h", "notify.repeat")
    webhook = spec.notify.get("webhook")
    firing_any = False
    retrain_done = None
    seen_keys = set()
    for a in spec.alerts:
        wlabel = str(a.get("window") or default_window)
        key = f"{a['when']} [{wlabel}]"
        seen_keys.add(key)
        figures = report["windows"][wlabel]
        value, why = _lookup(a, figures, kind)
        thr = _threshold_text(a)
        prev = state["alerts"].get(key, {})
        entry: dict[str, Any] = {"alert": key, "when": a["when"], "metric": a["metric"], "op": a["op"],
                                 "threshold": a["threshold"], "window": wlabel, "value": value, "do": a["do"]}
        if value is None:
            entry.update(status="unknown", reason=why, firing=bool(prev.get("firing")))
            entry["text"] = f"{a['metric']}: {why}"
            if prev.get("firing"):
                entry["text"] += f" (firing since {_hm(prev['since'])})"
                firing_any = True
            report["alerts"].append(entry)
            continue
        breach = _breach(value, a["op"], a["threshold"])
        text = describe(a["metric"], value, figures)
        entry.update(status="firing" if breach else "ok", firing=breach)
        entry["text"] = f"{text} ({a['op']} {thr}) → ALERT" if breach else f"{text} ok (alert {a['op']} {thr})"
        alert_text = f"{name} v{version}: {text} ({a['op']} {thr})"
        event = None
        if breach:
            firing_any = True
            if not prev.get("firing"):
                event = "firing"
                prev = {"firing": True, "since": now}
            elif now - prev.get("last_notified", 0) >= repeat:
                event = "firing"
                entry["repeat"] = True
            else:
                entry["suppressed"] = (f"still firing since {_hm(prev['since'])}; next notice after "
                                       f"{_hm(prev.get('last_notified', now) + repeat)} (notify.repeat {spec.notify.get('repeat')})")
        elif prev.get("firing"):
            event = "resolved"
            alert_text = f"{name} v{version}: resolved — {text}, no longer {a['op']} {thr} (firing since {_hm(prev['since'])})"
        if event:
            entry["event"] = event
            payload = {"model": name, "version": version, "metric": a["metric"], "value": value,
                       "threshold": a["threshold"], "op": a["op"], "when": a["when"], "window": wlabel,
                       "status": event, "alert": alert_text, "at": _iso(now), "host": socket.gethostname()}
            if a["metric"] in QUALITY_METRICS:
                payload["labelled"] = figures.get("labelled")
            notified = None
            if webhook and "notify" in a["do"]:
                notified = send(webhook, payload, float(spec.notify.get("timeout") or 5), int(spec.notify.get("retries", 3)))
                notified["webhook"] = redact_url(webhook)
                entry["notified"] = notified
                if notified["ok"]:
                    report["actions"].append(f"notified {redact_url(webhook)}")
                else:
                    report["actions"].append(f"webhook {redact_url(webhook)} failed after {notified['attempts']} "
                                             f"attempt(s): {notified['error']}")
            log(f"alert {event}: {alert_text}")
            try:
                reg.record(name, f"alert_{event}", version=version, metric=a["metric"], value=value,
                           threshold=a["threshold"], op=a["op"], when=a["when"], window=wlabel, alert=alert_text,
                           repeat=bool(entry.get("repeat")), notified=notified)
            except Exception as exc:
                report["notes"].append(f"could not write the alert_{event} ledger event: {exc}")
            if event == "firing":
                prev["last_notified"] = now
        if breach and "retrain" in a["do"]:
            if retrain_done is not None:
                entry["retrain"] = "already started by another alert in this run" if retrain_done.get("started") \
                    else retrain_done.get("blocked")
            elif now - prev.get("last_retrain", 0) < repeat:
                entry["retrain"] = (f"not started: this alert started one at {_hm(prev['last_retrain'])}; next "
                                    f"after {_hm(prev['last_retrain'] + repeat)} (notify.repeat)")
                report["actions"].append(f"retrain {entry['retrain']}")
            else:
                blocked = retrain_blocked(spec, reg)
                if blocked:
                    retrain_done = {"started": False, "blocked": f"not started: {blocked}"}
                    entry["retrain"] = retrain_done["blocked"]
                    report["actions"].append(f"retrain {retrain_done['blocked']}")
                    log(f"alert {key}: retrain {retrain_done['blocked']}")
                else:
                    why = f"alert '{a['when']}' firing ({text})"
                    if wait:
                        log(f"retrain {name}: starting mlpipe retrain --force ({why}); waiting for it")
                    retrain_done = start_retrain(spec, reg, wait, why, log)
                if blocked is None and not retrain_done.get("started"):
                    entry["retrain"] = retrain_done["blocked"]
                    report["actions"].append(f"retrain {retrain_done['blocked']}")
                    log(f"alert {key}: retrain {retrain_done['blocked']}")
                elif blocked is None:
                    prev["last_retrain"] = now
                    entry["retrain"] = retrain_done
                    report["retrain"] = retrain_done
                    action = f"retrain started (cooldown ok), log {retrain_done['log']}"
                    if wait:
                        action = f"retrain ran (cooldown ok), exit {retrain_done['exit_code']}, log {retrain_done['log']}"
                    report["actions"].append(action)
                    try:
                        reg.record(name, "monitor_retrain_started", version=version, alert=a["when"], reason=why,
                                   pid=retrain_done["pid"], log=retrain_done["log"], wait=wait,
                                   exit_code=retrain_done.get("exit_code"))
                    except Exception as exc:
                        report["notes"].append(f"could not write the monitor_retrain_started ledger event: {exc}")
        if breach or event == "resolved":
            prev.update(value=value, version=version, firing=breach)
            state["alerts"][key] = prev
        report["alerts"].append(entry)
    for key in list(state["alerts"]):  # alerts removed from the spec are forgotten
        if key not in seen_keys:
            del state["alerts"][key]
    state["last_run"] = now
    try:
        save_state(reg, name, state)
    except MlpipeError as exc:
        report["notes"].append(f"could not save the monitor state: {exc}")

    outcome = "firing" if firing_any else "healthy"
    report.update(outcome=outcome, exit_code=MONITOR_EXIT[outcome])
    report["summary"] = summary(report, spec)
    path = textfile or spec.monitor.get("textfile")
    if path:
        path = str(path).replace("{model}", name)
        try:
            write_textfile(path, report)
            report["textfile"] = path
        except OSError as exc:
            note = (f"could not write the Prometheus textfile {path} ({exc.strerror or exc}): check the folder "
                    f"exists and this user may write it (monitor.textfile / --textfile)")
            report["notes"].append(note)
            log(note)
    return _clean(report)


def summary(report: dict, spec: Spec) -> str:
    head = f"{report['model']} v{report['version']}: "
    parts = [a["text"] for a in report["alerts"]]
    if not spec.alerts:
        w = report["windows"].get(str(spec.monitor.get("window") or "1h"), {})
        v = w.get("values", {})
        shown = [f"{k} {v[k]:.3g}" for k in ("drift", "p99_ms", "error_rate", "accuracy", "r2") if k in v]
        parts = ["no alerts in the spec"] + shown
    lines = [head + "; ".join(parts)]
    tail = list(dict.fromkeys(report["actions"]))  # two alerts notified through one webhook: said once
    tail += [a["suppressed"] for a in report["alerts"] if a.get("suppressed")]
    if not tail:
        tail = ["all alerts quiet" if report["outcome"] == "healthy" else "firing (see above)"]
    lines.append("; ".join(tail))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- textfile
def write_textfile(path: str, report: dict) -> None:
    """The run's figures for node-exporter's textfile collector (written to a temporary file, then
    renamed: the collector never reads half a file). One file per model: put {model} in the path."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
    r = CollectorRegistry()
    model = report["model"]
    value = Gauge("mlpipe_monitor_value", "A measured figure (drift PSI, quality, p99_ms, error_rate) per window",
                  ["model", "metric", "window"], registry=r)
    rows = Gauge("mlpipe_monitor_captured_rows", "Captured predictions of the served version in the window",
                 ["model", "window"], registry=r)
    labelled = Gauge("mlpipe_monitor_labelled", "Labelled predictions (or labelled source rows) quality is measured on",
                     ["model", "window"], registry=r)
    threshold = Gauge("mlpipe_monitor_alert_threshold", "An alert's threshold", ["model", "alert", "metric", "op"],
                      registry=r)
    firing = Gauge("mlpipe_monitor_alert_firing", "1 while an alert is firing", ["model", "alert", "metric"], registry=r)
    known = Gauge("mlpipe_monitor_alert_measured", "1 when the alert's metric was measured in this run",
                  ["model", "alert", "metric"], registry=r)
    version = Gauge("mlpipe_monitor_served_version", "The version the monitor measured", ["model"], registry=r)
    has_base = Gauge("mlpipe_monitor_baseline", "1 when the served version has baseline statistics", ["model"], registry=r)
    up = Gauge("mlpipe_monitor_endpoint_up", "1 when the endpoint's /metrics answered", ["model", "endpoint"], registry=r)
    last = Gauge("mlpipe_monitor_last_run_timestamp_seconds", "When the monitor last ran (unix time)", ["model"],
                 registry=r)
    for label, w in report["windows"].items():
        for metric, v in w["values"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                value.labels(model, metric, label).set(v)
        rows.labels(model, label).set(w.get("rows") or 0)
        labelled.labels(model, label).set(w.get("labelled") or 0)
    for a in report["alerts"]:
        threshold.labels(model, a["alert"], a["metric"], a["op"]).set(a["threshold"])
        firing.labels(model, a["alert"], a["metric"]).set(1 if a.get("firing") else 0)
        known.labels(model, a["alert"], a["metric"]).set(0 if a["status"] == "unknown" else 1)
    version.labels(model).set(report["version"])
    has_base.labels(model).set(1 if report.get("baseline") else 0)
    for url, e in report["endpoints"].items():
        up.labels(model, url).set(1 if e.get("up") else 0)
    last.labels(model).set(datetime.strptime(report["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(path, r)


__all__ = ["run", "send", "scrape", "histogram_quantile", "feature_drift", "quality", "load_baseline",
           "retrain_blocked", "start_retrain", "write_textfile", "redact_url", "NotFound"]
