"""Build the estimator a spec names, split deterministically, fit, score, and write an artifact."""
from __future__ import annotations

import time
from pathlib import Path


from mlpipe import artifact, data
from mlpipe.errors import DataError, SpecError
from mlpipe.spec import Spec, import_object


def _build(path: str, params: dict, where: str):
    cls = import_object(path)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: cannot build {path} with params {params}: {exc}") from None


def build_estimator(spec: Spec):
    steps = spec.model.get("steps")
    if steps:
        from sklearn.pipeline import make_pipeline
        return make_pipeline(*[_build(s["estimator"], s.get("params") or {}, spec.path) for s in steps])
    return _build(spec.estimator_path, spec.params, spec.path)


def is_classifier(est) -> bool:
    from sklearn.base import is_classifier as _isc
    return bool(_isc(est))


def allows_nan(est) -> bool:
    try:
        from sklearn.utils import get_tags
        return bool(get_tags(est).input_tags.allow_nan)
    except Exception:
        return False


def algo_name(est) -> str:
    from sklearn.pipeline import Pipeline
    if isinstance(est, Pipeline):
        return type(est.steps[-1][1]).__name__
    return type(est).__name__


def signature(X, y, est) -> dict:
    inputs = [{"name": str(c), "dtype": str(X[c].dtype), "datatype": artifact.oip_datatype(X[c].dtype)}
              for c in X.columns]
    target = {"name": str(y.name), "dtype": str(y.dtype)}
    if is_classifier(est):
        target["kind"] = "classification"
        target["classes"] = [c.item() if hasattr(c, "item") else c for c in getattr(est, "classes_", [])]
    else:
        target["kind"] = "regression"
    return {"inputs": inputs, "target": target, "allow_nan": allows_nan(est)}


def split(spec: Spec, X, y, classifier: bool):
    from sklearn.model_selection import train_test_split
    s = spec.split
    stratify = y if (s.get("stratify", classifier) and classifier) else None
    try:
        return train_test_split(X, y, test_size=s.get("test_size", 0.2), random_state=s.get("random_state", 0),
                                shuffle=s.get("shuffle", True), stratify=stratify)
    except ValueError as exc:
        raise DataError(f"cannot split the data of {spec.data['source']}: {exc}",
                        hint="use more rows, a smaller test_size, or stratify: false") from None


def score(est, metrics: list, X, y) -> dict:
    from sklearn.metrics import get_scorer
    out = {}
    for name in metrics:
        try:
            out[name] = float(get_scorer(name)(est, X, y))
        except (ValueError, AttributeError, TypeError) as exc:
            raise SpecError(f"metric '{name}' cannot be computed for this model: {str(exc).splitlines()[0]}",
                            hint="use a scorer that fits the task (classification vs regression)") from None
    return out


def load_xy(spec: Spec, source: str | None = None):
    ds = data.load(source or spec.data["source"])
    X, y = data.split_xy(ds, spec.data["target"], spec.data.get("features"))
    return ds, X, y


def train(spec: Spec, workdir: Path, message: str = "", parent: dict | None = None,
          onnx: bool | None = None, dataset=None) -> dict:
    """Fit the spec's model and write an unregistered artifact into ``workdir``. Returns the manifest."""
    t0 = time.perf_counter()
    ds, X, y = dataset if dataset is not None else load_xy(spec)
    est = build_estimator(spec)
    classifier = is_classifier(est)
    X_train, X_test, y_train, y_test = split(spec, X, y, classifier)
    try:
        est.fit(X_train, y_train)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{spec.estimator_path} could not fit {ds.source}: {str(exc).splitlines()[0]}",
                        hint="non-numeric columns need an encoder: use a sklearn Pipeline as the estimator") from None
    fit_seconds = time.perf_counter() - t0
    metrics = score(est, spec.metrics, X_test, y_test)
    extra = {}
    onnx_info = {"status": "disabled"}
    if onnx is None:
        onnx = spec.model.get("onnx", True) is not False
    if onnx:
        from mlpipe import onnx as onnx_mod
        onnx_bytes, onnx_info = onnx_mod.convert_and_check(est, X_train, X_test, classifier)
        if onnx_bytes is not None:
            extra[artifact.ONNX_FILE] = onnx_bytes
    manifest = {
        "name": spec.name,
        "message": message,
        "estimator": spec.estimator_path,
        "algo": algo_name(est),
        "params": spec.params,
        "metrics": metrics,
        "data": {"source": ds.source, "fingerprint": ds.fingerprint, "rows": ds.rows,
                 "target": spec.data["target"], "train_rows": int(len(X_train)), "test_rows": int(len(X_test))},
        "split": {"test_size": spec.split.get("test_size", 0.2), "random_state": spec.split.get("random_state", 0),
                  "stratify": bool(spec.split.get("stratify", classifier) and classifier)},
        "signature": signature(X, y, est),
        "gate": spec.gate,
        "library_versions": artifact.library_versions(),
        "onnx": onnx_info,
        "parent": parent,
        "spec": spec.raw,
        "fit_seconds": round(fit_seconds, 4),
    }
    return artifact.write_dir(Path(workdir), est, manifest, extra)
