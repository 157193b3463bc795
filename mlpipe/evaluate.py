"""Checks with exit codes: a registered version on a data set (offline), or a live endpoint.

Every scikit-learn scorer is "greater is better" (error metrics are negated, ``neg_*``), so
``min`` and ``max_regression`` read the same for every metric. Exit codes: 0 pass, 1 a metric or
latency check failed, 2 endpoint unreachable or unhealthy, 3 usage error.
"""
from __future__ import annotations

import tempfile
import time

import numpy as np

from mlpipe import artifact, data
from mlpipe.errors import NotReady, UsageError


def parse_thresholds(items: tuple | list, flag: str) -> dict[str, float]:
    out = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"{flag} {item!r} is not METRIC=NUMBER", hint=f"e.g. {flag} accuracy=0.8") from None
    return out


def checks_for(metrics: dict, gate: dict, baseline: dict | None) -> list[dict]:
    out = []
    for name, threshold in (gate.get("min") or {}).items():
        value = metrics.get(name)
        out.append({"check": "min", "metric": name, "value": value, "threshold": threshold,
                    "passed": value is not None and value >= threshold})
    for name, threshold in (gate.get("max") or {}).items():
        value = metrics.get(name)
        out.append({"check": "max", "metric": name, "value": value, "threshold": threshold,
                    "passed": value is not None and value <= threshold})
    for name, threshold in (gate.get("max_regression") or {}).items():
        value = metrics.get(name)
        base = (baseline or {}).get(name)
        if base is None:
            out.append({"check": "max_regression", "metric": name, "value": value, "threshold": threshold,
                        "baseline": None, "passed": True, "note": "no baseline to compare with"})
            continue
        out.append({"check": "max_regression", "metric": name, "value": value, "baseline": base,
                    "threshold": threshold, "regression": None if value is None else base - value,
                    "passed": value is not None and base - value <= threshold})
    return out


def frame_for(manifest: dict, source: str):
    """Load ``source`` and cut it to the manifest's features and target."""
    ds = data.load(source)
    sig = manifest["signature"]
    features = [i["name"] for i in sig["inputs"]]
    target = sig["target"]["name"]
    X, y = data.split_xy(ds, target, features)
    return ds, X, y


def _wanted_metrics(names, gate: dict) -> list[str]:
    """The version's own metrics, then any the gate names, each once."""
    return list(dict.fromkeys(list(names or []) + [m for part in ("min", "max", "max_regression")
                                                   for m in (gate.get(part) or {})]))


def score_version(reg, name: str, version: int, metrics: list, X, y) -> dict:
    """Pull a registered version (sha256-verified), load it and score it on X, y."""
    from mlpipe.train import score
    with tempfile.TemporaryDirectory() as tmp:
        path, _, _ = reg.pull(f"{name}:{version}", tmp)
        model, _ = artifact.load_model(path)
        return score(model, metrics, X, y)


def offline(reg, ref: str, source: str | None, gate: dict | None = None, against: str | None = None) -> dict:
    """Score a registered version (and optionally a baseline version) on a data set."""
    name, version = reg.resolve(ref)
    manifest = reg.manifest(name, version)
    if source is None:
        source = manifest["data"]["source"]
    gate = gate if gate else (manifest.get("gate") or {})
    ds, X, y = frame_for(manifest, source)
    metrics = score_version(reg, name, version, _wanted_metrics(manifest.get("metrics"), gate), X, y)
    baseline = None
    baseline_ref = None
    if gate.get("max_regression"):
        if against is None:
            a = reg.alias(name, "production")
            against = f"{name}@production" if a and int(a["version"]) != version else None
        if against:
            bname, bversion = reg.resolve(against)
            baseline = score_version(reg, bname, bversion, list(gate["max_regression"]), X, y)
            baseline_ref = f"{bname}:{bversion}"
    checks = checks_for(metrics, gate, baseline)
    return {"model": name, "version": version, "id": manifest["id"], "data": {"source": ds.source, "rows": ds.rows,
            "fingerprint": ds.fingerprint}, "metrics": metrics, "baseline": baseline_ref,
            "baseline_metrics": baseline, "checks": checks, "passed": all(c["passed"] for c in checks)}


def describe_failures(report: dict) -> list[str]:
    lines = []
    for c in report.get("checks", []):
        if c["passed"]:
            continue
        if c["check"] == "max_regression":
            lines.append(f"{c['metric']} regressed by {c.get('regression'):.4f} against {report.get('baseline')} "
                         f"({c['value']:.4f} vs {c['baseline']:.4f}); allowed {c['threshold']}")
        elif c.get("value") is None:
            lines.append(f"{c['metric']}: no value measured")
        elif c["check"] == "max_p99_ms":
            lines.append(f"latency p99 = {c['value']:.1f} ms, needs <= {c['threshold']} ms")
        else:
            op = ">=" if c["check"] in ("min",) else "<="
            lines.append(f"{c['metric']} = {c['value']:.4f}, needs {op} {c['threshold']}")
    return lines


# ------------------------------------------------------------------------------------ live endpoint
class _Remote:
    """Just enough of an estimator for scikit-learn's scorers, answered by a live server."""

    def __init__(self, session, base: str, name: str, meta: dict, batch: int, timeout: float, latencies: list):
        self.session, self.base, self.name, self.batch, self.timeout = session, base.rstrip("/"), name, batch, timeout
        self.latencies = latencies
        self.classes_ = np.asarray(meta.get("parameters", {}).get("classes") or [])
        self.kind = meta.get("parameters", {}).get("kind", "classification")

    def _post(self, path: str, body: dict) -> dict:
        t = time.perf_counter()
        try:
            r = self.session.post(f"{self.base}{path}", json=body, timeout=self.timeout)
        except Exception as exc:
            raise NotReady(f"{self.base} did not answer {path}: {type(exc).__name__}") from None
        self.latencies.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise NotReady(f"{self.base}{path} answered {r.status_code}: {r.text[:200]}")
        return r.json()

    def _chunks(self, X):
        for i in range(0, len(X), self.batch):
            yield X.iloc[i:i + self.batch]

    def predict(self, X):
        out = []
        for chunk in self._chunks(X):
            body = {"dataframe_split": {"columns": [str(c) for c in chunk.columns], "data": chunk.astype(object).values.tolist()}}
            out.extend(self._post("/invocations", body)["predictions"])
        return np.asarray(out)

    def predict_proba(self, X):
        out = []
        for chunk in self._chunks(X):
            inputs = [{"name": str(c), "shape": [len(chunk)], "datatype": "BYTES" if chunk[c].dtype == object else "FP64",
                       "data": chunk[c].tolist()} for c in chunk.columns]
            res = self._post(f"/v2/models/{self.name}/infer", {"inputs": inputs, "outputs": [{"name": "predict_proba"}]})
            t = res["outputs"][0]
            out.append(np.asarray(t["data"], dtype=np.float64).reshape(t["shape"]))
        return np.vstack(out)


def _remote_estimator(remote: _Remote):
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    mixin = ClassifierMixin if remote.kind == "classification" else RegressorMixin

    class RemoteModel(mixin, BaseEstimator):
        def __init__(self):
            self.classes_ = remote.classes_

        def fit(self, X, y=None):  # pragma: no cover - never fitted here
            return self

        def predict(self, X):
            return remote.predict(X)

        if remote.kind == "classification":
            def predict_proba(self, X):
                return remote.predict_proba(X)
    return RemoteModel()


def endpoint(url: str, model: str | None = None, expect_version: int | None = None, source: str | None = None,
             gate: dict | None = None, max_p99_ms: float | None = None, reg=None, against: str | None = None,
             token: str | None = None, latency_requests: int = 50, timeout: float = 10.0, batch: int = 200) -> dict:
    """Liveness, readiness, version, latency and the gate's metrics, through a live server's API.

    Raises NotReady (exit 2) when the server is unreachable, unhealthy or serves another version.
    """
    import requests
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    base = url.rstrip("/")
    report: dict = {"endpoint": base, "checks": []}

    def get(path):
        try:
            return session.get(f"{base}{path}", timeout=timeout)
        except requests.RequestException as exc:
            raise NotReady(f"{base} is unreachable ({type(exc).__name__})",
                           hint="check the host, the port and that the server runs") from None
    if get("/v2/health/live").status_code != 200:
        raise NotReady(f"{base} is not live")
    ready = get("/v2/health/ready")
    if ready.status_code != 200:
        raise NotReady(f"{base} is not ready: {ready.text[:200]}")
    meta = get("/metadata")
    if meta.status_code != 200:
        raise NotReady(f"{base}/metadata answered {meta.status_code}: {meta.text[:200]}")
    meta = meta.json()
    report.update({"model": meta["name"], "version": meta["version"], "id": meta.get("id"), "runtime": meta.get("runtime")})
    if model and meta["name"] != model:
        raise NotReady(f"{base} serves model '{meta['name']}', expected '{model}'")
    if expect_version is not None and int(meta["version"]) != int(expect_version):
        raise NotReady(f"{base} serves {meta['name']} v{meta['version']}, expected v{expect_version}",
                       hint="the switch or reload did not take effect; see the server log and /metadata load_error")
    gate = gate or {}
    latencies: list = []
    remote = _Remote(session, base, meta["name"], get(f"/v2/models/{meta['name']}").json(), batch, timeout, latencies)
    if source:
        ds, X, y = frame_for(meta, source)
        from mlpipe.train import score
        metrics = score(_remote_estimator(remote), _wanted_metrics(meta.get("metrics"), gate), X, y)
        baseline = None
        if gate.get("max_regression") and against and reg is not None:
            bname, bversion = reg.resolve(against)
            baseline = score_version(reg, bname, bversion, list(gate["max_regression"]), X, y)
            report["baseline"] = f"{bname}:{bversion}"
        report.update({"data": {"source": ds.source, "rows": ds.rows}, "metrics": metrics, "baseline_metrics": baseline})
        report["checks"] += checks_for(metrics, gate, baseline)
        sample = X.iloc[: max(1, min(latency_requests, len(X)))]
        single = _Remote(session, base, meta["name"], {}, 1, timeout, latencies)
        latencies.clear()
        for i in range(len(sample)):
            single.predict(sample.iloc[i:i + 1])
    else:
        latencies.clear()
        for _ in range(latency_requests):
            t = time.perf_counter()
            get("/v2/health/ready")
            latencies.append((time.perf_counter() - t) * 1000)
    lat = np.asarray(latencies)
    report["latency_ms"] = {"requests": int(lat.size), "p50": float(np.percentile(lat, 50)),
                            "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99))}
    if max_p99_ms is not None:
        report["checks"].append({"check": "max_p99_ms", "metric": "latency_p99_ms", "value": report["latency_ms"]["p99"],
                                 "threshold": max_p99_ms, "passed": report["latency_ms"]["p99"] <= max_p99_ms})
    report["passed"] = all(c["passed"] for c in report["checks"])
    return report
