"""Convert a fitted estimator to ONNX and accept the conversion only if it agrees with scikit-learn.

Classifiers must give identical labels on the test split; regressors must stay within
``REGRESSION_RTOL`` relative (``REGRESSION_ATOL`` absolute) of scikit-learn's predictions.
"""
from __future__ import annotations

import numpy as np

REGRESSION_RTOL = 1e-4
REGRESSION_ATOL = 1e-5


def _numeric(X) -> bool:
    from pandas.api.types import is_bool_dtype, is_numeric_dtype
    return all(is_numeric_dtype(dt) or is_bool_dtype(dt) for dt in X.dtypes)


def _tree_based(est) -> bool:
    last = est.steps[-1][1] if hasattr(est, "steps") else est
    return type(last).__module__.startswith(("sklearn.tree", "sklearn.ensemble._forest", "sklearn.ensemble._gb",
                                               "sklearn.ensemble._hist_gradient_boosting"))


def convert_and_check(est, X_train, X_test, classifier: bool):
    """Return (onnx_bytes or None, info dict). Never raises: ONNX is a fast path, not a requirement."""
    if not _numeric(X_train):
        return None, {"status": "skipped", "reason": "non-numeric features"}
    try:
        from skl2onnx import to_onnx
    except ImportError:
        return None, {"status": "skipped", "reason": "skl2onnx not installed"}
    options = {id(est): {"zipmap": False}} if classifier else None
    Xtr = X_train.to_numpy(dtype=np.float64)
    Xte = X_test.to_numpy(dtype=np.float64)
    errors = []
    # scikit-learn's trees compare float32 features (they cast X themselves), so float32 is exact for
    # them and converts several times faster; other models keep double precision. The agreement check
    # below is the judge either way.
    attempts = [(np.float64, None), (np.float64, {"": 21, "ai.onnx.ml": 5}), (np.float32, None)]
    if _tree_based(est):
        attempts = attempts[2:] + attempts[:2]
    for dtype, opset in attempts:
        try:
            data = to_onnx(est, Xtr[:1].astype(dtype), options=options, target_opset=opset).SerializeToString()
            got = run(session(data), Xte)
            precision = "float64" if dtype is np.float64 else "float32"
            break
        except Exception as exc:  # unsupported estimator, converter or runtime limits
            errors.append(str(exc).splitlines()[0][:200])
    else:
        return None, {"status": "unsupported", "reason": errors[-1]}
    want = est.predict(X_test)
    if classifier:
        ok = bool(np.array_equal(np.asarray(got[0]).ravel(), np.asarray(want).ravel()))
        detail = {"check": "identical labels on the test split", "rows": int(len(want))}
    else:
        g = np.asarray(got[0], dtype=np.float64).ravel()
        ok = bool(np.allclose(g, np.asarray(want, dtype=np.float64), rtol=REGRESSION_RTOL, atol=REGRESSION_ATOL))
        detail = {"check": f"rtol={REGRESSION_RTOL} atol={REGRESSION_ATOL} on the test split",
                  "rows": int(len(want)), "max_abs_diff": float(np.max(np.abs(g - want))) if len(g) else 0.0}
    if not ok:
        return None, {"status": "rejected", "reason": "ONNX predictions disagree with scikit-learn", **detail}
    return data, {"status": "ok", "precision": precision, **detail}


def session(data: bytes):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(sess, X: np.ndarray):
    """Feed a float matrix; returns the session's outputs (labels first, probabilities second)."""
    inp = sess.get_inputs()[0]
    dtype = np.float32 if "float)" in inp.type and "double" not in inp.type else np.float64
    return sess.run(None, {inp.name: np.ascontiguousarray(X, dtype=dtype)})
