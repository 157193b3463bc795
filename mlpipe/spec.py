"""Load and validate a pipeline spec (YAML).

Every error names the file, the key and what was expected, so a user can fix the spec
without reading our code.
"""
from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlpipe.errors import SpecError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

# key -> (type, required) for each section; nested sections have their own table.
_TOP = {"name": str, "description": str, "data": dict, "split": dict, "model": dict,
        "metrics": list, "gate": dict, "retrain": dict, "notebook": str,
        "capture": dict, "alerts": list, "notify": dict, "monitor": dict}
_DATA = {"source": str, "target": str, "features": list, "holdout": str}
_SPLIT = {"test_size": (int, float), "random_state": int, "stratify": bool, "shuffle": bool}
_MODEL = {"estimator": str, "params": dict, "steps": list, "onnx": bool}
_STEP = {"estimator": str, "params": dict}
_GATE = {"min": dict, "max": dict, "max_regression": dict, "max_p99_ms": (int, float)}
_RETRAIN = {"schedule": str, "min_new_rows": int, "cooldown": (str, int), "promote": str, "deploy": bool}
_REQUIRED_TOP = ("name", "data", "model")
RETRAIN_DEFAULTS = {"schedule": "H H * * *", "min_new_rows": 1, "cooldown": "0s", "promote": "production",
                    "deploy": False}
# prediction capture on the serving hosts (mlpipe serve): the share of requests recorded (0 turns it
# off), and how long / how many rows the capture database keeps per model
_CAPTURE = {"sample": (int, float), "max_age": (str, int), "max_rows": int}
CAPTURE_DEFAULTS = {"sample": 0.1, "max_age": "30d", "max_rows": 1_000_000}
# one alert: "<metric> <op> <threshold>"; min_labelled applies to quality metrics only; window defaults
# to monitor.window; do: what a breach does (notify: log line, ledger event and the webhook if set;
# retrain: mlpipe retrain --force, bounded by retrain.cooldown)
_ALERT = {"when": str, "min_labelled": int, "window": (str, int), "do": (list, str)}
ALERT_DEFAULTS = {"min_labelled": 100, "window": None, "do": ["notify"]}
ALERT_ACTIONS = ("notify", "retrain")
ALERT_OPS = ("<", "<=", ">", ">=")
# where breaches go: a webhook (JSON POST, retried with backoff), and how often an ongoing breach is
# notified again (a "resolved" notice always follows when it clears)
_NOTIFY = {"webhook": str, "repeat": (str, int), "timeout": (int, float), "retries": int}
NOTIFY_DEFAULTS = {"webhook": None, "repeat": "1h", "timeout": 5, "retries": 3}
# mlpipe monitor: the window of captured predictions it looks at, the live endpoints whose /metrics it
# reads, an optional labelled data source scored through the first endpoint, the Prometheus textfile
# it writes, and when cron runs it (the retrain_cron role)
_MONITOR = {"window": (str, int), "endpoints": list, "source": str, "textfile": str, "schedule": str}
MONITOR_DEFAULTS = {"window": "1h", "endpoints": [], "source": None, "textfile": None, "schedule": "*/5 * * * *"}
# metrics an alert may name (besides drift_<feature>)
DRIFT_METRICS = ("drift", "prediction_drift")
SERVING_METRICS = ("p99_ms", "error_rate")
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1", "f1_macro", "f1_micro", "f1_weighted",
                          "precision", "precision_macro", "precision_weighted", "recall", "recall_macro",
                          "recall_weighted", "roc_auc")
REGRESSION_METRICS = ("r2", "rmse", "mae", "mse")
QUALITY_METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
_WHEN_RE = re.compile(r"^\s*(?P<metric>[^<>=\s](?:[^<>=]*?[^<>=\s])?)\s*(?P<op><=|>=|<|>)\s*(?P<threshold>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value, where: str = "duration") -> int:
    """'6h', '30m', '2d', '1w', '90s' or a number of seconds -> seconds."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _DURATION_RE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise SpecError(f"{where} {value!r} is not a duration",
                        hint="write a number with a unit: 90s, 30m, 6h, 2d or 1w")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


@dataclass
class Spec:
    name: str
    data: dict
    model: dict
    split: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)
    gate: dict = field(default_factory=dict)
    description: str = ""
    retrain: dict = field(default_factory=lambda: dict(RETRAIN_DEFAULTS))
    notebook: str | None = None
    capture: dict = field(default_factory=lambda: dict(CAPTURE_DEFAULTS))
    alerts: list = field(default_factory=list)     # parsed: when, metric, op, threshold, min_labelled, window, do
    notify: dict = field(default_factory=lambda: dict(NOTIFY_DEFAULTS))
    monitor: dict = field(default_factory=lambda: dict(MONITOR_DEFAULTS))
    path: str = "<dict>"
    raw: dict = field(default_factory=dict)

    @property
    def estimator_path(self) -> str:
        if self.model.get("steps"):
            return "sklearn.pipeline.Pipeline(" + ",".join(s["estimator"] for s in self.model["steps"]) + ")"
        return self.model["estimator"]

    @property
    def params(self) -> dict:
        return dict(self.model.get("params") or {})


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return {"str": "a string", "dict": "a mapping", "list": "a list", "bool": "true/false",
            "int": "an integer"}.get(t.__name__, t.__name__)


def _check_section(where: str, section: Any, table: dict, path: str) -> None:
    if not isinstance(section, dict):
        raise SpecError(f"{path}: '{where}' must be a mapping, got {type(section).__name__}")
    for key, value in section.items():
        if key not in table:
            raise SpecError(f"{path}: unknown key '{where}.{key}'" if where else f"{path}: unknown key '{key}'",
                            hint=f"expected one of: {', '.join(sorted(table))}")
        expected = table[key]
        if value is not None and not isinstance(value, expected) or (
                expected in (int, (int, float)) and isinstance(value, bool)):
            full = f"{where}.{key}" if where else key
            raise SpecError(f"{path}: '{full}' must be {_type_name(expected)}, got {value!r}")


def import_object(dotted: str, what: str = "estimator"):
    """Import 'pkg.module.Name'; errors say which part failed."""
    if not isinstance(dotted, str) or "." not in dotted:
        raise SpecError(f"{what} '{dotted}' is not an import path",
                        hint="write it like sklearn.tree.DecisionTreeClassifier")
    module_name, _, attr = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"unknown {what} '{dotted}': cannot import module '{module_name}' ({exc})",
                        hint="check the spelling or install the package that provides it") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SpecError(f"unknown {what} '{dotted}': module '{module_name}' has no '{attr}'",
                        hint="check the spelling and capitalisation of the class name") from None


def known_metrics() -> set[str]:
    from sklearn.metrics import get_scorer_names
    return set(get_scorer_names())


def _check_params(path: str, where: str, estimator: str, params: dict) -> None:
    est_cls = import_object(estimator)
    if not callable(est_cls):
        raise SpecError(f"{path}: '{where}.estimator' {estimator} is not a class")
    if not isinstance(params, dict):
        raise SpecError(f"{path}: '{where}.params' must be a mapping")
    if hasattr(est_cls, "get_params"):
        try:
            valid = set(est_cls().get_params(deep=False))
        except TypeError:
            return
        bad = sorted(set(params) - valid)
        if bad:
            raise SpecError(f"{path}: '{where}.params' has unknown parameter(s) {', '.join(bad)} for {estimator}",
                            hint=f"valid parameters: {', '.join(sorted(valid))}")


def validate(raw: Any, path: str = "<dict>") -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a pipeline spec must be a YAML mapping at the top level, "
                        f"got {type(raw).__name__}", hint="start from examples/credit-risk.yml")
    _check_section("", raw, _TOP, path)
    for key in _REQUIRED_TOP:
        if key not in raw or raw[key] in (None, ""):
            raise SpecError(f"{path}: missing required key '{key}'", hint="see examples/credit-risk.yml")
    if not NAME_RE.match(raw["name"]):
        raise SpecError(f"{path}: 'name' {raw['name']!r} is not a valid model name",
                        hint="use lowercase letters, digits and '-', starting with a letter or digit")
    _check_section("data", raw["data"], _DATA, path)
    for key in ("source", "target"):
        if not raw["data"].get(key):
            raise SpecError(f"{path}: missing required key 'data.{key}'")
    from mlpipe.data import check_source_uri
    try:
        check_source_uri(raw["data"]["source"])
    except Exception as exc:  # DataError -> SpecError naming the key
        raise SpecError(f"{path}: 'data.source': {exc}") from None
    _check_section("split", raw.get("split") or {}, _SPLIT, path)
    ts = (raw.get("split") or {}).get("test_size", 0.2)
    if isinstance(ts, float) and not 0 < ts < 1 or isinstance(ts, int) and ts < 1:
        raise SpecError(f"{path}: 'split.test_size' must be a fraction between 0 and 1 or a row count, got {ts!r}")
    _check_section("model", raw["model"], _MODEL, path)
    steps = raw["model"].get("steps")
    if steps:
        if raw["model"].get("estimator") or raw["model"].get("params"):
            raise SpecError(f"{path}: 'model' has both 'steps' and 'estimator'/'params'",
                            hint="use 'estimator' + 'params' for one estimator, or 'steps' for a Pipeline")
        for i, step in enumerate(steps):
            where = f"model.steps[{i}]"
            _check_section(where, step, _STEP, path)
            if not step.get("estimator"):
                raise SpecError(f"{path}: missing required key '{where}.estimator'")
            _check_params(path, where, step["estimator"], step.get("params") or {})
    elif not raw["model"].get("estimator"):
        raise SpecError(f"{path}: missing required key 'model.estimator'",
                        hint="e.g. sklearn.tree.DecisionTreeClassifier, or 'steps' for a Pipeline")
    else:
        _check_params(path, "model", raw["model"]["estimator"], raw["model"].get("params") or {})
    metrics = raw.get("metrics") or []
    names = known_metrics()
    for m in metrics:
        if m not in names:
            close = [n for n in sorted(names) if m.lower() in n or n in str(m).lower()][:5]
            raise SpecError(f"{path}: unknown metric '{m}' in 'metrics'",
                            hint=f"use a scikit-learn scorer name{(', e.g. ' + ', '.join(close)) if close else ' such as accuracy, f1_macro, r2, neg_mean_absolute_error'}")
    gate = raw.get("gate") or {}
    _check_section("gate", gate, _GATE, path)
    for part in ("min", "max", "max_regression"):
        for m, v in (gate.get(part) or {}).items():
            if m not in metrics:
                raise SpecError(f"{path}: 'gate.{part}.{m}' names a metric that is not in 'metrics'",
                                hint=f"add {m} to 'metrics' or remove it from the gate")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise SpecError(f"{path}: 'gate.{part}.{m}' must be a number, got {v!r}")
    retrain = raw.get("retrain") or {}
    _check_section("retrain", retrain, _RETRAIN, path)
    retrain = {**RETRAIN_DEFAULTS, **{k: v for k, v in retrain.items() if v is not None}}
    if retrain["min_new_rows"] < 0:
        raise SpecError(f"{path}: 'retrain.min_new_rows' must be 0 or more, got {retrain['min_new_rows']}")
    parse_duration(retrain["cooldown"], f"{path}: 'retrain.cooldown'")
    from mlpipe.registry import ALIAS_RE
    if not ALIAS_RE.match(retrain["promote"]):
        raise SpecError(f"{path}: 'retrain.promote' {retrain['promote']!r} is not a valid alias name",
                        hint="use lowercase letters, digits, '-' or '_', e.g. production")
    from mlpipe.schedule import ScheduleError, expand
    try:
        expand(retrain["schedule"], raw["name"])
    except ScheduleError as exc:
        raise SpecError(f"{path}: 'retrain.schedule': {exc}",
                        hint='five cron fields, H for a value derived from the model name, e.g. "H 3 * * *"') from None
    notebook = raw.get("notebook") or None
    if notebook is not None and not str(notebook).endswith(".ipynb"):
        raise SpecError(f"{path}: 'notebook' {notebook!r} is not a Jupyter notebook",
                        hint="name an .ipynb file, relative to the spec's folder or absolute")
    capture, alerts, notify, monitor = _check_monitoring(raw, path)
    return Spec(name=raw["name"], data=dict(raw["data"]), model=dict(raw["model"]),
                split=dict(raw.get("split") or {}), metrics=list(metrics), gate=dict(gate),
                description=raw.get("description") or "", retrain=retrain, notebook=notebook,
                capture=capture, alerts=alerts, notify=notify, monitor=monitor,
                path=path, raw=copy.deepcopy(raw))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _http_url(value) -> bool:
    from urllib.parse import urlsplit
    try:
        u = urlsplit(value)
    except ValueError:
        return False
    return u.scheme in ("http", "https") and bool(u.hostname)


def parse_when(when, where: str, features: list | None = None) -> dict:
    """'accuracy < 0.80' -> {"metric": "accuracy", "op": "<", "threshold": 0.8}; a SpecError naming
    ``where`` when the expression or its metric is not one ``mlpipe monitor`` can measure."""
    m = _WHEN_RE.match(when) if isinstance(when, str) else None
    if not m:
        raise SpecError(f"{where} {when!r} is not an alert condition",
                        hint="write METRIC OP NUMBER with OP one of < <= > >=, e.g. 'accuracy < 0.80' or 'drift > 0.2'")
    metric, op, threshold = m.group("metric"), m.group("op"), float(m.group("threshold"))
    if metric.startswith("drift_"):
        feature = metric[len("drift_"):]
        if features and feature not in [str(f) for f in features]:
            raise SpecError(f"{where} names drift_{feature}, but '{feature}' is not one of 'data.features'",
                            hint=f"features: {', '.join(map(str, features[:20]))}")
    elif metric not in DRIFT_METRICS + SERVING_METRICS + QUALITY_METRICS:
        raise SpecError(f"{where} {when!r}: unknown metric '{metric}'",
                        hint="use drift, drift_<feature>, prediction_drift, p99_ms, error_rate or a quality metric: "
                             + ", ".join(QUALITY_METRICS))
    return {"metric": metric, "op": op, "threshold": threshold}


def _check_monitoring(raw: dict, path: str) -> tuple[dict, list, dict, dict]:
    """The spec's capture, alerts, notify and monitor sections, validated, with defaults filled in."""
    capture = raw.get("capture") or {}
    _check_section("capture", capture, _CAPTURE, path)
    capture = {**CAPTURE_DEFAULTS, **{k: v for k, v in capture.items() if v is not None}}
    if not 0 <= capture["sample"] <= 1:
        raise SpecError(f"{path}: 'capture.sample' must be a share between 0 and 1, got {capture['sample']!r}",
                        hint="0.1 records one request in ten; 0 turns capture off; 1 records every request")
    parse_duration(capture["max_age"], f"{path}: 'capture.max_age'")
    if capture["max_rows"] < 1:
        raise SpecError(f"{path}: 'capture.max_rows' must be 1 or more, got {capture['max_rows']}")

    notify = raw.get("notify") or {}
    _check_section("notify", notify, _NOTIFY, path)
    notify = {**NOTIFY_DEFAULTS, **{k: v for k, v in notify.items() if v is not None}}
    if notify["webhook"] is not None and not _http_url(notify["webhook"]):
        raise SpecError(f"{path}: 'notify.webhook' must be an http:// or https:// URL, got {notify['webhook']!r}",
                        hint='e.g. webhook: "https://hooks.example/ml"')
    parse_duration(notify["repeat"], f"{path}: 'notify.repeat'")
    if notify["timeout"] <= 0:
        raise SpecError(f"{path}: 'notify.timeout' must be a number of seconds above 0, got {notify['timeout']!r}")
    if notify["retries"] < 0:
        raise SpecError(f"{path}: 'notify.retries' must be 0 or more, got {notify['retries']}")

    monitor = raw.get("monitor") or {}
    _check_section("monitor", monitor, _MONITOR, path)
    monitor = {**MONITOR_DEFAULTS, **{k: v for k, v in monitor.items() if v is not None}}
    parse_duration(monitor["window"], f"{path}: 'monitor.window'")
    for i, url in enumerate(monitor["endpoints"]):
        if not isinstance(url, str) or not _http_url(url):
            raise SpecError(f"{path}: 'monitor.endpoints[{i}]' must be an http:// or https:// URL, got {url!r}",
                            hint="the base URL of a serving host, e.g. http://10.0.0.5:8080")
    if monitor["source"]:
        from mlpipe.data import check_source_uri
        try:
            check_source_uri(monitor["source"])
        except Exception as exc:
            raise SpecError(f"{path}: 'monitor.source': {exc}") from None
    from mlpipe.schedule import ScheduleError, expand
    try:
        expand(monitor["schedule"], raw["name"])
    except ScheduleError as exc:
        raise SpecError(f"{path}: 'monitor.schedule': {exc}",
                        hint='five cron fields, e.g. "*/5 * * * *" for every five minutes') from None

    alerts = []
    features = (raw.get("data") or {}).get("features")
    for i, alert in enumerate(raw.get("alerts") or []):
        where = f"alerts[{i}]"
        if isinstance(alert, str):  # shorthand: - "drift > 0.2"
            alert = {"when": alert}
        _check_section(where, alert, _ALERT, path)
        if not alert.get("when"):
            raise SpecError(f"{path}: missing required key '{where}.when'", hint="e.g. when: accuracy < 0.80")
        entry = {"when": alert["when"].strip(), **parse_when(alert["when"], f"{path}: '{where}.when'", features),
                 **ALERT_DEFAULTS, **{k: v for k, v in alert.items() if k != "when" and v is not None}}
        if entry["min_labelled"] < 0:
            raise SpecError(f"{path}: '{where}.min_labelled' must be 0 or more, got {entry['min_labelled']}")
        if entry["window"] is not None:
            parse_duration(entry["window"], f"{path}: '{where}.window'")
        do = [entry["do"]] if isinstance(entry["do"], str) else list(entry["do"])
        for action in do:
            if action not in ALERT_ACTIONS:
                raise SpecError(f"{path}: '{where}.do' has unknown action {action!r}",
                                hint=f"use {' and/or '.join(ALERT_ACTIONS)}, e.g. do: [notify, retrain]")
        entry["do"] = list(dict.fromkeys(do))
        alerts.append(entry)
    return capture, alerts, notify, monitor


def load(path: str | Path) -> Spec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"pipeline spec {path} not found", hint="pass the path of a YAML file, e.g. examples/credit-risk.yml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}",
                        hint="check indentation and quoting") from None
    spec = validate(raw, str(path))
    # relative csv/parquet paths are relative to the spec's folder when they exist there
    from mlpipe.data import resolve_relative
    spec.data["source"] = resolve_relative(spec.data["source"], p.parent)
    if spec.data.get("holdout"):
        spec.data["holdout"] = resolve_relative(spec.data["holdout"], p.parent)
    if spec.monitor.get("source"):
        spec.monitor["source"] = resolve_relative(spec.monitor["source"], p.parent)
    if spec.notebook:
        nb = Path(spec.notebook)
        spec.notebook = str(nb if nb.is_absolute() else (p.parent / nb).resolve())
        if not Path(spec.notebook).is_file():
            raise SpecError(f"{path}: 'notebook' {nb} not found (looked for {spec.notebook})",
                            hint="give the notebook's path relative to the spec's folder, or an absolute path")
    return spec
