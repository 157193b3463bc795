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
        "metrics": list, "gate": dict, "retrain": dict, "notebook": str}
_DATA = {"source": str, "target": str, "features": list, "holdout": str}
_SPLIT = {"test_size": (int, float), "random_state": int, "stratify": bool, "shuffle": bool}
_MODEL = {"estimator": str, "params": dict, "steps": list, "onnx": bool}
_STEP = {"estimator": str, "params": dict}
_GATE = {"min": dict, "max": dict, "max_regression": dict, "max_p99_ms": (int, float)}
_RETRAIN = {"schedule": str, "min_new_rows": int, "cooldown": (str, int), "promote": str, "deploy": bool}
_REQUIRED_TOP = ("name", "data", "model")
RETRAIN_DEFAULTS = {"schedule": "H H * * *", "min_new_rows": 1, "cooldown": "0s", "promote": "production",
                    "deploy": False}
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
    return Spec(name=raw["name"], data=dict(raw["data"]), model=dict(raw["model"]),
                split=dict(raw.get("split") or {}), metrics=list(metrics), gate=dict(gate),
                description=raw.get("description") or "", retrain=retrain, notebook=notebook,
                path=path, raw=copy.deepcopy(raw))


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
    if spec.notebook:
        nb = Path(spec.notebook)
        spec.notebook = str(nb if nb.is_absolute() else (p.parent / nb).resolve())
        if not Path(spec.notebook).is_file():
            raise SpecError(f"{path}: 'notebook' {nb} not found (looked for {spec.notebook})",
                            hint="give the notebook's path relative to the spec's folder, or an absolute path")
    return spec
