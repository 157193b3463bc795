"""Build the estimator a spec names, split deterministically, fit, score, and write an artifact."""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path

from mlpipe import artifact, data, linear
from mlpipe.errors import DataError, SpecError
from mlpipe.spec import Spec, import_object

log = logging.getLogger("mlpipe.train")

HOLDOUT_FILE = "holdout.parquet"
HOLDOUT_MAX_ROWS = 50_000   # a bigger evaluation set is sampled down to this (deterministically)
HOLDOUT_SAMPLE_SEED = 0
TEST_SPLIT = "test split"


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


def split_params(spec: Spec, classifier: bool) -> dict:
    """The ``train_test_split`` arguments a spec asks for (recorded in the manifest as ``split``)."""
    s = spec.split
    return {"test_size": s.get("test_size", 0.2), "random_state": s.get("random_state", 0),
            "shuffle": s.get("shuffle", True), "stratify": bool(s.get("stratify", classifier) and classifier)}


def split_with(params: dict, X, y, source: str):
    """Split X, y with recorded parameters: the one ``train_test_split`` call training makes."""
    from sklearn.model_selection import train_test_split
    try:
        return train_test_split(X, y, test_size=params.get("test_size", 0.2), random_state=params.get("random_state", 0),
                                shuffle=params.get("shuffle", True), stratify=y if params.get("stratify") else None)
    except ValueError as exc:
        raise DataError(f"cannot split the data of {data.redact_source(source)}: {exc}",
                        hint="use more rows, a smaller test_size, or stratify: false") from None


def split(spec: Spec, X, y, classifier: bool):
    return split_with(split_params(spec, classifier), X, y, spec.data["source"])


class _Predicted:
    """An estimator whose ``predict`` of one matrix is computed once and kept: every ``predict``-based
    scorer, and the ONNX parity check after them, use the same labels instead of predicting again
    (a 150-tree forest predicts its test split in ~0.1 s). Everything else is the estimator's own."""

    def __init__(self, est, X):
        self._est, self._X, self.predictions = est, X, None

    def predict(self, X, *args, **kwargs):
        if X is not self._X or args or kwargs:
            return self._est.predict(X, *args, **kwargs)
        if self.predictions is None:
            self.predictions = self._est.predict(X)
        return self.predictions

    def __sklearn_tags__(self):
        return self._est.__sklearn_tags__()

    def __getattr__(self, name):
        return getattr(self._est, name)


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


def holdout(spec: Spec, X_test, y_test) -> tuple[bytes, dict]:
    """The version's evaluation data as Parquet bytes, and its ``data.holdout`` manifest entry.

    The spec's ``data.holdout`` (cut to the training features and target) when it names one, else
    the rows the version was scored on (its test split). More than ``HOLDOUT_MAX_ROWS`` rows are
    sampled down, with a fixed seed, and the manifest says so.
    """
    import pandas as pd
    source = spec.data.get("holdout")
    if source:
        hds = data.load(source)
        hX, hy = data.split_xy(hds, spec.data["target"], [c for c in X_test.columns])
        frame = pd.concat([hX, hy], axis=1)
        source = hds.source  # as data.load shows it (a password masked)
    else:
        source = TEST_SPLIT
        frame = pd.concat([X_test, y_test], axis=1)
    info = {"file": HOLDOUT_FILE, "rows": int(len(frame)), "source": source}
    if len(frame) > HOLDOUT_MAX_ROWS:
        info.update({"sampled_from_rows": int(len(frame)),
                     "sample": f"{HOLDOUT_MAX_ROWS} rows drawn with pandas sample(random_state={HOLDOUT_SAMPLE_SEED})"})
        frame = frame.sample(n=HOLDOUT_MAX_ROWS, random_state=HOLDOUT_SAMPLE_SEED)
        info["rows"] = HOLDOUT_MAX_ROWS
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    info["fingerprint"] = data.fingerprint(frame)
    buf = io.BytesIO()
    try:
        frame.to_parquet(buf, index=False)
    except Exception as exc:  # pyarrow refuses e.g. object columns that mix numbers and strings
        raise DataError(f"cannot store the evaluation data ({source}) as {HOLDOUT_FILE}: {str(exc).splitlines()[0]}",
                        hint="give every column one type (numbers or strings)") from None
    return buf.getvalue(), info


def baseline(X_train, predictions, classifier: bool) -> tuple[bytes | None, dict | None]:
    """``baseline.json`` (what ``mlpipe monitor`` measures drift against) and its manifest entry. Never
    fails a training run: a frame it cannot describe leaves the version without a baseline (logged),
    which the monitor reports as such."""
    from mlpipe import baseline as bl
    try:
        doc = bl.compute(X_train, predictions, "classification" if classifier else "regression")
        raw = bl.to_bytes(doc)
    except Exception as exc:  # pragma: no cover - defensive: odd dtypes in a user's frame
        log.warning("no baseline statistics for this version (%s: %s); mlpipe monitor will not measure drift",
                    type(exc).__name__, exc)
        return None, None
    return raw, {"file": bl.BASELINE_FILE, "rows": int(len(X_train)), "schema": bl.SCHEMA}


def train(spec: Spec, workdir: Path, message: str = "", parent: dict | None = None,
          onnx: bool | None = None, dataset=None) -> dict:
    """Fit the spec's model and write an unregistered artifact into ``workdir``. Returns the manifest."""
    t0 = time.perf_counter()
    ds, X, y = dataset if dataset is not None else load_xy(spec)
    est = build_estimator(spec)
    classifier = is_classifier(est)
    X_train, X_test, y_train, y_test = split(spec, X, y, classifier)
    holdout_bytes, holdout_info = holdout(spec, X_test, y_test)  # before the fit: a bad holdout fails fast
    if onnx is None:
        onnx = spec.model.get("onnx", True) is not False
    if onnx:  # the ONNX libraries are imported while the model fits
        from mlpipe import onnx as onnx_mod
        importing = onnx_mod.preload(X_train)
    try:
        est.fit(X_train, y_train)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{spec.estimator_path} could not fit {ds.source}: {str(exc).splitlines()[0]}",
                        hint="non-numeric columns need an encoder: use a sklearn Pipeline as the estimator") from None
    fit_seconds = time.perf_counter() - t0
    compiling = None
    if onnx:  # the ONNX session and its check predictions run beside the scoring and the writing
        if importing is not None:
            importing.join()
        compiling = onnx_mod.Conversion(est, X_train, X_test, classifier).start()
    predicted = _Predicted(est, X_test)
    metrics = score(predicted, spec.metrics, X_test, y_test)
    extra = {HOLDOUT_FILE: holdout_bytes}
    baseline_bytes, baseline_info = baseline(X_train, predicted.predict(X_test), classifier)
    if baseline_bytes is not None:
        extra[baseline_info["file"]] = baseline_bytes
    sig = signature(X, y, est)
    linear_bytes = linear.export(est, X_test, predicted.predict(X_test), sig)
    if linear_bytes is not None:  # the serving fast path for small requests (mlpipe.linear)
        extra[linear.FILE] = linear_bytes
    manifest = {
        "name": spec.name,
        "message": message,
        "estimator": spec.estimator_path,
        "algo": algo_name(est),
        "params": spec.params,
        "metrics": metrics,
        "data": {"source": ds.source, "fingerprint": ds.fingerprint, "rows": ds.rows,
                 "target": spec.data["target"], "train_rows": int(len(X_train)), "test_rows": int(len(X_test)),
                 "holdout": holdout_info},
        "split": split_params(spec, classifier),
        "signature": sig,
        "gate": spec.gate,
        "baseline": baseline_info,
        "library_versions": artifact.library_versions(),
        "onnx": {"status": "pending"} if compiling is not None else {"status": "disabled"},
        "parent": parent,
        "spec": spec.raw,
        "fit_seconds": round(fit_seconds, 4),
    }
    written = artifact.write_dir(Path(workdir), est, manifest, extra)
    if compiling is None:
        return written
    # the ONNX file is stored only when it agrees with scikit-learn on the test split
    onnx_bytes, onnx_info = compiling.result(want=predicted.predictions)
    if onnx_bytes is None:
        return artifact.update_manifest(Path(workdir), {"onnx": onnx_info})
    return artifact.add_file(Path(workdir), artifact.ONNX_FILE, onnx_bytes, fields={"onnx": onnx_info})
