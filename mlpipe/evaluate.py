"""Checks with exit codes: a registered version on a data set (offline), or a live endpoint.

Every scikit-learn scorer is "greater is better" (error metrics are negated, ``neg_*``), so
``min`` and ``max_regression`` read the same for every metric. Exit codes: 0 pass, 1 a metric or
latency check failed, 2 endpoint unreachable or unhealthy, 3 usage error.

Without a data source, a version is scored on the evaluation data it stores (``holdout.parquet``,
pulled and sha256-verified with it); a version from before that file existed is scored on its test
split, recomputed from its training source with the split parameters its manifest recorded.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mlpipe import artifact, data
from mlpipe.errors import DataError, IntegrityError, NotReady, UsageError

REQUIRE_ONNX_ENV = "MLPIPE_REQUIRE_ONNX"


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


def _cut(manifest: dict, ds):
    sig = manifest["signature"]
    features = [i["name"] for i in sig["inputs"]]
    X, y = data.split_xy(ds, sig["target"]["name"], features)
    return ds, X, y


def frame_for(manifest: dict, source: str):
    """Load ``source`` and cut it to the manifest's features and target."""
    return _cut(manifest, data.load(source))


def stored_holdout(path: Path, manifest: dict):
    """The evaluation data a pulled version stores (verified), as a Dataset; None for older versions."""
    info = (manifest.get("data") or {}).get("holdout") or {}
    fname = info.get("file")
    if not fname or fname not in (manifest.get("files") or {}):
        return None
    artifact.verify_dir(path, manifest, only=[fname])
    ds = data.load(f"parquet:{Path(path) / fname}")
    return data.Dataset(frame=ds.frame, source=f"{manifest['name']}:{manifest['version']}/{fname}")


def recomputed_test_split(manifest: dict):
    """A version's test split, recomputed from its training source with the recorded split parameters.

    The same ``train_test_split`` call training made; refused when the source's content changed
    since (then the rows would not be the ones the version never saw).
    """
    from mlpipe.train import split_with
    ref = f"{manifest['name']}:{manifest['version']}"
    d = manifest["data"]
    ds = data.load(d["source"])
    if d.get("fingerprint") and ds.fingerprint != d["fingerprint"]:
        raise DataError(f"{ref} stores no holdout and its training source {d['source']} changed since it was trained "
                        f"(fingerprint {ds.fingerprint[:12]}, trained on {d['fingerprint'][:12]}): its test split "
                        "cannot be recomputed", hint="pass --data with data the version never trained on")
    _, X, y = _cut(manifest, ds)
    params = dict(manifest.get("split") or {})
    params.setdefault("shuffle", ((manifest.get("spec") or {}).get("split") or {}).get("shuffle", True))
    _, X_test, _, y_test = split_with(params, X, y, d["source"])
    import pandas as pd
    return data.Dataset(frame=pd.concat([X_test, y_test], axis=1),
                        source=f"test split of {d['source']} (recomputed: {ref} stores no holdout)")


def evaluation_data(manifest: dict, path: Path, source: str | None):
    """(Dataset, X, y, holdout info or None): ``source`` when given, else what the version stores."""
    if source:
        return (*frame_for(manifest, source), None)
    ds = stored_holdout(path, manifest)
    if ds is not None:
        return (*_cut(manifest, ds), manifest["data"]["holdout"])
    return (*_cut(manifest, recomputed_test_split(manifest)), None)


def _data_report(ds, holdout: dict | None) -> dict:
    out = {"source": ds.source, "rows": ds.rows, "fingerprint": ds.fingerprint}
    if holdout is not None:
        out["holdout"] = holdout
    return out


def _wanted_metrics(names, gate: dict) -> list[str]:
    """The version's own metrics, then any the gate names, each once."""
    return list(dict.fromkeys(list(names or []) + [m for part in ("min", "max", "max_regression")
                                                   for m in (gate.get(part) or {})]))


def require_onnx_from_env() -> bool:
    return os.environ.get(REQUIRE_ONNX_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _model_for_scoring(path: Path, manifest: dict, require_onnx: bool):
    """What the scorers call: the scikit-learn model, or (require_onnx) the ONNX graph the server runs."""
    if not require_onnx:
        model, _ = artifact.load_model(path, manifest)
        return model
    if artifact.ONNX_FILE not in (manifest.get("files") or {}):
        raise IntegrityError(f"{manifest['name']}:{manifest['version']} has no {artifact.ONNX_FILE} and require_onnx "
                             f"refuses to unpickle {artifact.MODEL_FILE}",
                             hint=f"evaluate without --require-onnx ({REQUIRE_ONNX_ENV}), "
                                  "or register a model skl2onnx can convert")
    from mlpipe.serve import LoadedModel
    lm = LoadedModel.load(Path(path), require_onnx=True)

    def matrix(X):
        return X.to_numpy(dtype=np.float64) if hasattr(X, "to_numpy") else np.asarray(X, dtype=np.float64)
    return _estimator(lm.kind, np.asarray(lm.classes), lambda X: lm.predict(matrix(X))[0],
                      lambda X: lm.predict(matrix(X), proba=True)[1])


def _score_dir(path: Path, manifest: dict, metrics: list, X, y, require_onnx: bool) -> dict:
    from mlpipe.train import score
    return score(_model_for_scoring(path, manifest, require_onnx), metrics, X, y)


def score_version(reg, name: str, version: int, metrics: list, X, y, require_onnx: bool = False) -> dict:
    """Pull a registered version (sha256-verified), load it and score it on X, y.

    ``require_onnx`` (or env MLPIPE_REQUIRE_ONNX=1): score the version's ``model.onnx`` with
    onnxruntime, as a require_onnx server runs it; a version without one is refused, and nothing
    is unpickled.
    """
    require_onnx = require_onnx or require_onnx_from_env()
    with tempfile.TemporaryDirectory() as tmp:
        path, manifest, _ = reg.pull(f"{name}:{version}", tmp)
        return _score_dir(path, manifest, metrics, X, y, require_onnx)


def _baseline(reg, name: str, version: int, against: str | None, gate: dict, X, y, require_onnx: bool):
    """Scores of the regression baseline (``against``, default NAME@production unless it is this version)."""
    if not gate.get("max_regression"):
        return None, None
    if against is None:
        a = reg.alias(name, "production")
        against = f"{name}@production" if a and int(a["version"]) != version else None
    if not against:
        return None, None
    bname, bversion = reg.resolve(against)
    return score_version(reg, bname, bversion, list(gate["max_regression"]), X, y, require_onnx), f"{bname}:{bversion}"


def offline(reg, ref: str, source: str | None, gate: dict | None = None, against: str | None = None,
            require_onnx: bool = False) -> dict:
    """Score a registered version (and optionally a baseline version) on a data set.

    ``source`` None: the version's stored holdout (or, for older versions, its recomputed test split).
    """
    require_onnx = require_onnx or require_onnx_from_env()
    name, version = reg.resolve(ref)
    with tempfile.TemporaryDirectory() as tmp:
        path, manifest, _ = reg.pull(f"{name}:{version}", tmp)
        gate = gate if gate else (manifest.get("gate") or {})
        ds, X, y, holdout = evaluation_data(manifest, path, source)
        metrics = _score_dir(path, manifest, _wanted_metrics(manifest.get("metrics"), gate), X, y, require_onnx)
    baseline, baseline_ref = _baseline(reg, name, version, against, gate, X, y, require_onnx)
    checks = checks_for(metrics, gate, baseline)
    return {"model": name, "version": version, "id": manifest["id"], "data": _data_report(ds, holdout),
            "metrics": metrics, "baseline": baseline_ref, "baseline_metrics": baseline, "checks": checks,
            "passed": all(c["passed"] for c in checks), "runtime": "onnxruntime" if require_onnx else "sklearn"}


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
            out.extend(self._post(f"/models/{self.name}/invocations", body)["predictions"])
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


def _estimator(kind: str, classes, predict, predict_proba):
    """A scikit-learn estimator whose predictions come from elsewhere (a server, an ONNX session)."""
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    mixin = ClassifierMixin if kind == "classification" else RegressorMixin

    class ExternalModel(mixin, BaseEstimator):
        def __init__(self):
            self.classes_ = classes

        def fit(self, X, y=None):  # pragma: no cover - never fitted here
            return self

        def predict(self, X):
            return predict(X)

        if kind == "classification":
            def predict_proba(self, X):
                return predict_proba(X)
    return ExternalModel()


def _remote_estimator(remote: _Remote):
    return _estimator(remote.kind, remote.classes_, remote.predict, remote.predict_proba)


def _served_version_data(reg, meta: dict, base: str):
    """(Dataset, X, y, holdout info) for the version a server reports, from the registry (verified)."""
    name, version = meta["name"], int(meta["version"])
    with tempfile.TemporaryDirectory() as tmp:
        path, manifest, _ = reg.pull(f"{name}:{version}", tmp)
        if meta.get("id") and manifest.get("id") != meta["id"]:
            raise IntegrityError(f"{base} serves {name} v{version} with id {meta['id']}, but {name}:{version} in "
                                 f"{reg.url} has id {manifest.get('id')}: its stored holdout belongs to another artifact",
                                 hint="pass the registry the host pulled from (--registry), or --data")
        return evaluation_data(manifest, path, None)


def endpoint(url: str, model: str | None = None, expect_version: int | None = None, source: str | None = None,
             gate: dict | None = None, max_p99_ms: float | None = None, reg=None, against: str | None = None,
             token: str | None = None, latency_requests: int = 50, timeout: float = 10.0, batch: int = 200,
             require_onnx: bool = False) -> dict:
    """Liveness, readiness, version, latency and the gate's metrics, through a live server's API.

    The metrics are measured on ``source``, or without one on the stored holdout of the version the
    server reports, pulled from ``reg``. ``require_onnx`` applies to scoring the baseline offline.
    Raises NotReady (exit 2) when the server is unreachable, unhealthy or serves another version.
    """
    import requests
    session = requests.Session()
    session.headers["X-Mlpipe-Capture"] = "off"  # a check's rows are not live traffic: keep them out of capture
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
    # a named model is checked through its own routes (a multi-model host, or a balancer that routes by name)
    ready_path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
    meta_path = f"/models/{model}/metadata" if model else "/metadata"
    ready = get(ready_path)
    if ready.status_code == 404 and model:
        try:
            why = ready.json().get("error", "")
        except ValueError:
            why = ready.text[:200]
        raise NotReady(f"{base} does not serve the expected model '{model}': {why}")
    if ready.status_code != 200:
        raise NotReady(f"{base} is not ready{' to serve ' + model if model else ''}: {ready.text[:200]}")
    meta = get(meta_path)
    if meta.status_code != 200:
        raise NotReady(f"{base}{meta_path} answered {meta.status_code}: {meta.text[:200]}")
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
    thresholds = any(gate.get(k) for k in ("min", "max", "max_regression"))
    if thresholds and not source and reg is None:
        raise UsageError("metric thresholds need evaluation data: --data SOURCE, or a registry to pull the served "
                         "version's stored holdout from", hint="e.g. --registry s3://ml-models/prod, or --data csv:holdout.csv")
    if source or thresholds:
        if source:
            ds, X, y = frame_for(meta, source)
            holdout = None
        else:
            ds, X, y, holdout = _served_version_data(reg, meta, base)
        from mlpipe.train import score
        metrics = score(_remote_estimator(remote), _wanted_metrics(meta.get("metrics"), gate), X, y)
        baseline = None
        if gate.get("max_regression") and against and reg is not None:
            bname, bversion = reg.resolve(against)
            baseline = score_version(reg, bname, bversion, list(gate["max_regression"]), X, y, require_onnx)
            report["baseline"] = f"{bname}:{bversion}"
        report.update({"data": _data_report(ds, holdout), "metrics": metrics, "baseline_metrics": baseline})
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
            get(ready_path)
            latencies.append((time.perf_counter() - t) * 1000)
    lat = np.asarray(latencies)
    report["latency_ms"] = {"requests": int(lat.size), "p50": float(np.percentile(lat, 50)),
                            "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99))}
    if max_p99_ms is not None:
        report["checks"].append({"check": "max_p99_ms", "metric": "latency_p99_ms", "value": report["latency_ms"]["p99"],
                                 "threshold": max_p99_ms, "passed": report["latency_ms"]["p99"] <= max_p99_ms})
    report["passed"] = all(c["passed"] for c in report["checks"])
    return report
