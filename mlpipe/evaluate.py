"""Checks with exit codes: a registered version on a data set (offline), or a live endpoint.

Every scikit-learn scorer is "greater is better" (error metrics are negated, ``neg_*``), so
``min`` and ``max_regression`` read the same for every metric. Exit codes: 0 pass, 1 a metric or
latency check failed, 2 endpoint unreachable or unhealthy, 3 usage error.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from mlpipe import artifact, data
from mlpipe.errors import UsageError


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


def score_manifest_metrics(model, names: list, X, y) -> dict:
    from mlpipe.train import score
    return score(model, names, X, y)


def offline(reg, ref: str, source: str | None, gate: dict | None = None, against: str | None = None) -> dict:
    """Score a registered version (and optionally a baseline version) on a data set."""
    name, version = reg.resolve(ref)
    manifest = reg.manifest(name, version)
    if source is None:
        source = manifest["data"]["source"]
    gate = gate if gate else (manifest.get("gate") or {})
    wanted = list(dict.fromkeys(list(manifest.get("metrics") or {}) +
                                [m for part in ("min", "max", "max_regression") for m in (gate.get(part) or {})]))
    ds, X, y = frame_for(manifest, source)
    with tempfile.TemporaryDirectory() as tmp:
        path, _, _ = reg.pull(f"{name}:{version}", tmp)
        model, _ = artifact.load_model(path)
        metrics = score_manifest_metrics(model, wanted, X, y)
        baseline = None
        baseline_ref = None
        if gate.get("max_regression"):
            if against is None:
                a = reg.alias(name, "production")
                against = f"{name}@production" if a and int(a["version"]) != version else None
            if against:
                bname, bversion = reg.resolve(against)
                bpath, _, _ = reg.pull(f"{bname}:{bversion}", tmp)
                bmodel, _ = artifact.load_model(bpath)
                baseline = score_manifest_metrics(bmodel, list(gate["max_regression"]), X, y)
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
        else:
            op = ">=" if c["check"] in ("min",) else "<="
            lines.append(f"{c['metric']} = {c['value']:.4f}, needs {op} {c['threshold']}")
    return lines

