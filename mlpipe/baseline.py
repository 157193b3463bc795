"""Baseline statistics of a version's training data, kept with the version (``baseline.json``) so
``mlpipe monitor`` can tell how far live inputs and predictions have drifted from what the model
learned on.

Per feature:

    numeric       quantile bin edges of the training values (``BINS`` bins; the outer bins are open,
                  so a live value beyond the training range still lands in one), the share of rows in
                  each bin and the share missing, mean, std, min, max, and a sample of at most
                  ``SAMPLE`` values (what scipy's two-sample Kolmogorov-Smirnov test compares with)
    categorical   the share of each of the ``TOP`` most frequent values (as strings), of all the others
                  (``OTHER``) and of missing values (``MISSING``)

and ``prediction``: the same statistics of the model's predictions on its test split (class shares for
a classifier, bins for a regressor).

Everything is computed with numpy from a fixed-seed sample where a sample is needed, so the same data
gives the same bytes; a 1M-row frame takes well under a second per feature. The file is JSON
(no NaN or infinity: missing numbers are null).
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

BASELINE_FILE = "baseline.json"
SCHEMA = 1
BINS = 10
SAMPLE = 2000          # values kept per numeric feature for the KS test
TOP = 50               # categories kept per categorical feature; the rest count as OTHER
EDGE_ROWS = 200_000    # quantile edges come from at most this many values (fixed-seed sample)
SEED = 0
OTHER = "__other__"
MISSING = "__missing__"
EPS = 1e-4             # a share of 0 counts as this much in the PSI (log of 0 is undefined)


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def is_numeric(values) -> bool:
    """Numeric dtypes (bool excluded: two categories, not a scale)."""
    import pandas as pd
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    return bool(pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype))


def _subsample(values: np.ndarray, n: int) -> np.ndarray:
    if values.size <= n:
        return values
    idx = _rng().choice(values.size, size=n, replace=False)
    return values[np.sort(idx)]


def numeric_stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    total = int(v.size)
    finite = v[np.isfinite(v)]
    out: dict[str, Any] = {"kind": "numeric", "rows": total}
    if finite.size == 0:
        out.update(edges=[], proportions=[], missing=1.0 if total else 0.0, mean=None, std=None, min=None,
                   max=None, sample=[])
        return out
    cut = np.quantile(_subsample(finite, EDGE_ROWS), np.linspace(0, 1, BINS + 1)[1:-1])
    edges = np.unique(cut)
    counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=edges.size + 1)
    out.update(edges=[float(e) for e in edges],
               proportions=[float(c) / total for c in counts],
               missing=float(total - finite.size) / total,
               mean=_num(finite.mean()), std=_num(finite.std()), min=_num(finite.min()), max=_num(finite.max()),
               sample=[float(x) for x in _subsample(finite, SAMPLE)])
    return out


def _labels(values):
    """Values as strings (how categories are keyed in JSON), missing ones as MISSING."""
    import pandas as pd
    s = pd.Series(values) if not isinstance(values, pd.Series) else values
    s = s.reset_index(drop=True)
    missing = s.isna().to_numpy()
    labels = s.astype(object).astype(str).to_numpy(dtype=object)
    labels[missing] = MISSING
    return labels


def categorical_stats(values) -> dict:
    import pandas as pd
    labels = pd.Series(_labels(values), dtype=object)
    total = int(labels.size)
    counts = labels.value_counts(sort=False)
    order = sorted(((int(c), str(k)) for k, c in counts.items() if k != MISSING), key=lambda t: (-t[0], t[1]))
    kept = order[:TOP]
    props = {k: c / total for c, k in kept}
    other = sum(c for c, _ in order[TOP:])
    out = {"kind": "categorical", "rows": total, "proportions": dict(sorted(props.items())),
           "other": other / total if total else 0.0,
           "missing": int(counts.get(MISSING, 0)) / total if total else 0.0}
    return out


def stats(values) -> dict:
    return numeric_stats(values) if is_numeric(values) else categorical_stats(values)


def compute(X, predictions=None, kind: str | None = None) -> dict:
    """The baseline of a training frame ``X`` and (optionally) the model's test-split ``predictions``;
    ``kind`` 'classification' counts predicted classes, 'regression' bins predicted values."""
    features = {str(c): stats(X[c]) for c in X.columns}
    out: dict[str, Any] = {"schema": SCHEMA, "rows": int(len(X)), "bins": BINS, "seed": SEED, "features": features}
    if predictions is not None:
        p = np.asarray(predictions)
        out["prediction"] = categorical_stats(p) if kind == "classification" else numeric_stats(p)
    return out


def to_bytes(baseline: dict) -> bytes:
    return json.dumps(baseline, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


def from_bytes(raw: bytes) -> dict:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("features"), dict):
        raise ValueError("not an mlpipe baseline (no 'features' table)")
    return doc


# ------------------------------------------------------------------------------------- comparison
def live_proportions(stat: dict, values) -> tuple[np.ndarray, np.ndarray]:
    """(baseline shares, live shares) over the same cells: the baseline's bins (or categories, OTHER)
    and the missing share, so the two vectors can be compared by PSI or a chi-square test."""
    if stat["kind"] == "numeric":
        v = np.asarray(_to_float(values), dtype=np.float64)
        total = max(int(v.size), 1)
        finite = v[np.isfinite(v)]
        edges = np.asarray(stat["edges"], dtype=np.float64)
        counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=edges.size + 1)
        live = np.append(counts / total, (v.size - finite.size) / total)
        base = np.append(np.asarray(stat["proportions"] or [0.0], dtype=np.float64), stat["missing"])
        if base.size != live.size:  # a feature with no finite value at training time
            live = np.array([finite.size / total, (v.size - finite.size) / total])
            base = np.array([0.0, 1.0])
        return base, live
    import pandas as pd
    labels = pd.Series(_labels(values), dtype=object)
    total = max(len(labels), 1)
    keys = list(stat["proportions"])
    seen = labels.value_counts()
    counts = np.array([seen.get(k, 0) for k in keys] + [0, seen.get(MISSING, 0)], dtype=np.float64)
    counts[len(keys)] = len(labels) - counts.sum()
    base = np.array([stat["proportions"][k] for k in keys] + [stat["other"], stat["missing"]], dtype=np.float64)
    return base, counts / total


def _to_float(values) -> np.ndarray:
    import pandas as pd
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)


def psi(expected, actual) -> float:
    """Population stability index: sum((a - e) * ln(a / e)) over the cells, shares floored at EPS.
    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 a large shift."""
    e = np.clip(np.asarray(expected, dtype=np.float64), EPS, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), EPS, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))
