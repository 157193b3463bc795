"""Linear models scored in plain Python: the serving fast path for small requests.

A one-row prediction through ONNX Runtime costs a few microseconds in a loop, but under load (every
request a new connection, the caches cold) it is a third of a worker's time per request: a session
run touches a dozen kernels, an allocator and numpy on the way in and out. A linear model needs
only one dot product per class, which plain Python does on the parsed JSON lists directly.

At training, ``export`` writes what a linear model computes (``linear.json``: one weight row and
intercept per class or target, and the means and scales of the scaling steps before it) when the
fitted estimator is one scikit-learn linear model, alone or after ``StandardScaler`` steps, and
only when these numbers give exactly the labels (or, for a regressor, the values within 1e-9)
scikit-learn predicts on the test split.
At serving, ``LinearScorer.labels`` answers requests of up to ``MAX_ROWS`` rows whose values are all
finite floats; anything else (an integer, a null, a string, an infinite value, a wrong row length)
returns None and the request goes the general way, with its checks and error messages. Larger
requests, once checked, are one numpy product (``matrix_labels``) instead of an ONNX Runtime run.
"""
from __future__ import annotations

import json
import math
from typing import Any

FILE = "linear.json"
MAX_ROWS = 8          # beyond this, one numpy product beats a Python loop per row
# float (op) float only: an int, bool, None or str value raises TypeError (the request goes the general way)
_mul, _sub, _div = float.__mul__, float.__sub__, float.__truediv__


class LinearScorer:
    """``coef``: one list of weights per class score (one for a binary classifier or a regressor),
    in the signature's feature order; ``intercept``: one per score; ``classes``: the labels
    (classification) or None (regression); ``scalers``: the StandardScaler steps before the model,
    each ``{"mean": [...] or None, "scale": [...] or None}``, applied as scikit-learn does,
    ``(x - mean) / scale``, so the scaled values are the same numbers (folding them into the weights
    would lose digits when a mean is large next to its scale)."""

    def __init__(self, coef: list[list[float]], intercept: list[float], classes: list | None,
                 scalers: list[dict] | None = None):
        self.coef = [[float(w) for w in row] for row in coef]
        self.intercept = [float(b) for b in intercept]
        self.classes = list(classes) if classes is not None else None
        self.n_features = n = len(self.coef[0]) if self.coef else 0
        self.scalers = []
        for sc in scalers or []:
            mean, scale = sc.get("mean"), sc.get("scale")
            step = ([float(v) for v in mean] if mean is not None else None,
                    [float(v) for v in scale] if scale is not None else None)
            if any(v is not None and (len(v) != n or not all(math.isfinite(x) for x in v)) for v in step) or (
                    step[1] is not None and 0.0 in step[1]):
                raise ValueError("a scaler's mean and scale must be finite, one per feature, no zero scale")
            self.scalers.append(step)
        self._np = None  # numpy copies for matrix_labels, made at its first call
        if not self.coef or any(len(r) != n for r in self.coef) or len(self.intercept) != len(self.coef):
            raise ValueError("coef must be a non-empty rectangle with one intercept per row")
        if not all(math.isfinite(w) for r in self.coef for w in r) or not all(math.isfinite(b) for b in self.intercept):
            raise ValueError("coef and intercept must be finite")
        if self.classes is None:
            if len(self.coef) != 1:
                raise ValueError("a regressor has one weight row (one target)")
        elif len(self.coef) == 1 and len(self.classes) != 2 or len(self.coef) > 1 and len(self.classes) != len(self.coef):
            raise ValueError(f"{len(self.coef)} weight rows do not fit {len(self.classes)} classes")

    def labels(self, rows) -> list | None:
        """The predictions for ``rows`` (a list of lists of floats), or None when the request is not
        one this path takes: too many rows, a row that is not a list of ``n_features`` floats, or
        a value that is not finite (then the score is not finite either: inf * 0 is NaN)."""
        if type(rows) is not list or not 0 < len(rows) <= MAX_ROWS:
            return None
        n, out, scalers, classes = self.n_features, [], self.scalers, self.classes
        try:
            for row in rows:
                if type(row) is not list or len(row) != n:
                    return None
                for mean, scale in scalers:
                    if mean is not None:
                        row = list(map(_sub, row, mean))
                    if scale is not None:
                        row = list(map(_div, row, scale))
                if len(self.coef) == 1:
                    s = sum(map(_mul, row, self.coef[0])) + self.intercept[0]
                    if s - s != 0.0:  # inf or NaN
                        return None
                    out.append(s if classes is None else classes[1] if s > 0.0 else classes[0])
                    continue
                scores = [sum(map(_mul, row, w)) + b for w, b in zip(self.coef, self.intercept)]
                best = 0
                for k, s in enumerate(scores):
                    if s - s != 0.0:
                        return None
                    if s > scores[best]:
                        best = k
                out.append(classes[best])
            return out
        except TypeError:
            return None

    def matrix_labels(self, X):
        """The predictions for a float matrix (numpy; more rows than ``labels`` takes), or None when a
        score is not finite (an overflow: the model's own run decides those)."""
        import numpy as np
        if self._np is None:
            self._np = (np.asarray(self.coef, dtype=np.float64).T, np.asarray(self.intercept, dtype=np.float64),
                        None if self.classes is None else np.asarray(self.classes),
                        [tuple(None if v is None else np.asarray(v, dtype=np.float64) for v in st) for st in self.scalers])
        W, b, classes, scalers = self._np
        with np.errstate(over="ignore", invalid="ignore"):
            for mean, scale in scalers:
                if mean is not None:
                    X = X - mean
                if scale is not None:
                    X = X / scale
            scores = X @ W + b
        if not np.isfinite(scores).all():
            return None
        if classes is None:
            return scores[:, 0]
        return classes[(scores[:, 0] > 0.0).astype(np.intp) if scores.shape[1] == 1 else scores.argmax(axis=1)]

    def to_json(self) -> bytes:
        return json.dumps({"coef": self.coef, "intercept": self.intercept, "classes": self.classes,
                           "scalers": [{"mean": m, "scale": s} for m, s in self.scalers]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "LinearScorer":
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError(f"{FILE} is not an object")
        return cls(doc["coef"], doc["intercept"], doc.get("classes"), doc.get("scalers"))


def _affine_steps(est) -> tuple[list, Any] | None:
    """(the StandardScaler steps before the final estimator, the final estimator), or None when the
    model is anything else."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    if isinstance(est, Pipeline):
        steps = [s for _, s in est.steps if s is not None and s != "passthrough"]
        if not steps or not all(isinstance(s, StandardScaler) for s in steps[:-1]):
            return None
        return steps[:-1], steps[-1]
    return [], est


def export(est, X_test, predicted, signature: dict) -> bytes | None:
    """``linear.json`` for a fitted linear model (see the module), or None. ``X_test``: the test
    split (in signature order); ``predicted``: ``est.predict(X_test)``, which the numbers must reproduce."""
    import numpy as np
    from sklearn.base import is_classifier, is_regressor
    try:
        from sklearn.linear_model._base import LinearClassifierMixin, LinearModel
    except ImportError:  # a scikit-learn that moved them: no fast path, nothing else changes
        return None

    if signature.get("allow_nan") or not all(i["datatype"] != "BYTES" for i in signature["inputs"]) or len(X_test) == 0:
        return None
    found = _affine_steps(est)
    if found is None:
        return None
    scalers, final = found
    classifier = is_classifier(final) and isinstance(final, LinearClassifierMixin)
    if not classifier and not (is_regressor(final) and isinstance(final, LinearModel)):
        return None
    coef = np.asarray(getattr(final, "coef_", None), dtype=np.float64)
    intercept = np.atleast_1d(np.asarray(getattr(final, "intercept_", 0.0), dtype=np.float64))
    n = len(signature["inputs"])
    if coef.ndim == 1:
        coef = coef[None, :]
    if coef.ndim != 2 or coef.shape[1] != n:
        return None
    if intercept.shape == (1,) and coef.shape[0] > 1:
        intercept = np.repeat(intercept, coef.shape[0])
    classes = [v.item() if hasattr(v, "item") else v for v in final.classes_] if classifier else None
    if classes is not None and not (all(type(c) is int for c in classes) or all(type(c) is str for c in classes)):
        return None  # float or bool labels: ONNX Runtime answers them as integers, this path could not match both
    steps = [{"mean": s.mean_.tolist() if s.with_mean and getattr(s, "mean_", None) is not None else None,
              "scale": s.scale_.tolist() if s.with_std and getattr(s, "scale_", None) is not None else None}
             for s in scalers]
    try:
        scorer = LinearScorer(coef.tolist(), intercept.tolist(), classes, steps)
    except (ValueError, TypeError):
        return None
    if classifier and classes != signature["target"].get("classes"):
        return None
    # the proof: the same predictions as scikit-learn on the test split (at most 2000 rows)
    try:
        X = np.asarray(X_test, dtype=np.float64)[:2000]
    except (ValueError, TypeError):
        return None
    want = np.asarray(predicted)[:2000]
    got = []
    for i in range(0, len(X), MAX_ROWS):
        part = scorer.labels(X[i:i + MAX_ROWS].tolist())
        if part is None:
            return None
        got.extend(part)
    if classifier:
        want = [v.item() if hasattr(v, "item") else v for v in want]
        if got != want or any(type(a) is not type(b) for a, b in zip(got, want)):
            return None
    elif not np.allclose(got, np.asarray(want, dtype=np.float64).ravel(), rtol=1e-9, atol=1e-9):
        return None
    return scorer.to_json()
