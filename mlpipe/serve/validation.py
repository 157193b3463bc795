"""Checks shared by both protocols: a JSON body, row counts, finite values, and rows -> the matrix
(or DataFrame) the model takes, in signature order, with a message naming the first offending field."""
from __future__ import annotations

import json

import numpy as np
import orjson

from mlpipe.errors import PayloadTooLarge, ValidationError
from mlpipe.serve.model import NUMERIC_OIP, LoadedModel, Scored


def parse_json(body: bytes):
    """orjson first (a third of json.loads' time); what it refuses (the NaN and Infinity literals
    Python's json.dumps writes, integers beyond 64 bits) goes through json.loads, which also words
    the error for a body that really is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"body is not valid JSON: {exc}") from None




def bad(msg: str, hint: str | None = None) -> ValidationError:
    return ValidationError(msg, hint=hint)


def takes(m: LoadedModel) -> str:
    shown = ", ".join(m.features[:8])
    return f"this model takes {len(m.features)} features: {shown}{', ...' if len(m.features) > 8 else ''} (GET /v2/models/{m.name})"


def check_rows(n: int, max_rows: int) -> None:
    if n == 0:
        raise bad("no rows to predict", hint="send at least one row")
    if n > max_rows:
        raise PayloadTooLarge(f"{n} rows is more than this server takes ({max_rows})", hint="split the request")


def finite_check(m: LoadedModel, X: np.ndarray) -> None:
    if X.dtype.kind != "f":
        return
    wrong = ~np.isfinite(X)
    if m.allow_nan:
        wrong &= ~np.isnan(X)
    if wrong.any():
        col = m.features[int(np.argwhere(wrong)[0][1])]
        what = "NaN/null or infinite values" if not m.allow_nan else "infinite values"
        raise bad(f"feature '{col}' has {what}; this model cannot take them",
                  hint="send a finite number for every feature")


def _first_error(m: LoadedModel, rows: list, names: list[str]) -> ValidationError | None:
    """The first offending row or field, or None (slow: numeric models only call it after the fast path failed)."""
    for r, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            return bad(f"row {r} is {type(row).__name__}, expected a list of {len(names)} values")
        if len(row) != len(names):
            return bad(f"row {r} has {len(row)} values, expected {len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        for name, v in zip(names, row):
            dt = m.datatypes[m.index[name]]
            if dt in NUMERIC_OIP:
                if v is None:
                    if m.allow_nan:
                        continue
                    return bad(f"feature '{name}' in row {r} is null (NaN); this model cannot take missing values",
                               hint=f"send a number ({dt})")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    return bad(f"feature '{name}' in row {r} is {json.dumps(v)[:40]}, expected a number ({dt})")
            elif not isinstance(v, str) and v is not None:
                return bad(f"feature '{name}' in row {r} is {json.dumps(v)[:40]}, expected a string ({dt})")
    return None


def _invalid(m: LoadedModel, rows: list, names: list[str]) -> ValidationError:
    return _first_error(m, rows, names) or bad("rows are not a table of numbers", hint="send one list of values per row")


def scored(m: LoadedModel, rows, max_rows: int) -> Scored | None:
    """Rows in signature order already predicted by the model's linear scorer (mlpipe.linear), or
    None: the model has none, or the request is not one it takes (then ``to_matrix`` checks it)."""
    if m.linear is None or type(rows) is not list or len(rows) > max_rows:
        return None
    labels = m.linear.labels(rows)
    return None if labels is None else Scored(rows, labels)


def to_matrix(m: LoadedModel, rows: list, names: list[str], max_rows: int):
    """Rows of values in ``names`` order -> what the model takes, in signature order."""
    if names is m.features or names == m.features:
        fast = scored(m, rows, max_rows)
        if fast is not None:
            return fast
    if not isinstance(rows, list):
        raise bad(f"expected a list of rows, got {type(rows).__name__}")
    check_rows(len(rows), max_rows)
    unknown = [] if names is m.features or names == m.features else [n for n in names if n not in m.index]
    if unknown:
        raise bad(f"unknown feature '{unknown[0]}'", hint=takes(m))
    given = set(names)
    if len(given) != len(names):
        raise bad("a feature is given twice")
    missing = [f for f in m.features if f not in given]
    if missing:
        raise bad(f"missing feature '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                  hint=takes(m))
    if m.numeric:
        try:
            X = np.asarray(rows)
        except ValueError:  # ragged
            raise _invalid(m, rows, names) from None
        if X.ndim != 2 or X.shape[1] != len(names) or X.dtype.kind not in "fiu":
            # slow path: name the offending field; only nulls for a NaN-tolerant model get through
            err = _first_error(m, rows, names)
            if err is not None or not m.allow_nan:
                raise err or bad("rows are not a table of numbers", hint="send one list of values per row")
            X = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
        X = X.astype(np.float64, copy=False)
        if names != m.features:
            X = X[:, [names.index(f) for f in m.features]]
        finite_check(m, X)
        return X
    import pandas as pd
    err = _first_error(m, rows, names)
    if err is not None:
        raise err
    frame = pd.DataFrame(rows, columns=names)[m.features]
    for f, dt in zip(m.features, m.datatypes):
        if dt in NUMERIC_OIP:
            frame[f] = frame[f].astype(np.float64)
            if not m.allow_nan and frame[f].isna().any():
                raise bad(f"feature '{f}' has null values; this model cannot take them")
    return frame
