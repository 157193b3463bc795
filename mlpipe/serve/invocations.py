"""The MLflow scoring protocol: a ``POST /invocations`` body (``dataframe_split``,
``dataframe_records``, ``instances``, ``inputs``, or CSV) -> the model's matrix."""
from __future__ import annotations

import io

from mlpipe.errors import UnsupportedMediaType
from mlpipe.serve.model import LoadedModel
from mlpipe.serve.validation import bad, check_rows, parse_json, takes, to_matrix


def columns_to_matrix(m: LoadedModel, columns: dict, max_rows: int):
    if not isinstance(columns, dict):
        raise bad("expected an object mapping feature names to lists of values")
    names = list(columns)
    lengths = set()
    for n, v in columns.items():
        if not isinstance(v, list):
            columns[n] = v = [v]
        lengths.add(len(v))
    if len(lengths) > 1:
        raise bad(f"features have different numbers of values ({sorted(lengths)})", hint="send one value per row for every feature")
    return to_matrix(m, [list(r) for r in zip(*columns.values())], names, max_rows)


def records_to_matrix(m: LoadedModel, records: list, max_rows: int):
    if not isinstance(records, list):
        raise bad(f"expected a list of records, got {type(records).__name__}")
    check_rows(len(records), max_rows)
    rows = []
    names = m.features
    fset = set(names)
    for r, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise bad(f"record {r} is {type(rec).__name__}, expected an object of feature: value")
        if rec.keys() != fset:
            extra = [k for k in rec if k not in fset]
            if extra:
                raise bad(f"unknown feature '{extra[0]}' in record {r}", hint=takes(m))
            missing = [f for f in names if f not in rec]
            raise bad(f"missing feature '{missing[0]}' in record {r}", hint=takes(m))
        rows.append([rec[f] for f in names])
    return to_matrix(m, rows, names, max_rows)


def parse_invocations(m: LoadedModel, content_type: str, body: bytes, max_rows: int):
    ctype = content_type if content_type == "application/json" else (content_type or "").split(";")[0].strip().lower()
    if ctype == "text/csv":
        import pandas as pd
        try:
            frame = pd.read_csv(io.BytesIO(body))
        except Exception as exc:
            raise bad(f"cannot parse CSV: {str(exc).splitlines()[0]}") from None
        frame = frame.astype(object).where(frame.notna(), None)
        return to_matrix(m, frame.values.tolist(), [str(c) for c in frame.columns], max_rows)
    if ctype != "application/json":
        raise UnsupportedMediaType(f"content type {content_type or '(none)'!r} is not supported",
                                   hint="send application/json or text/csv")
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise bad("the JSON body must be an object with one of dataframe_split, dataframe_records, instances, inputs")
    keys = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in doc]
    if len(keys) != 1:
        raise bad("the JSON body must have exactly one of dataframe_split, dataframe_records, instances, inputs"
                  + (f" (got {', '.join(keys)})" if keys else ""),
                   hint='e.g. {"dataframe_split": {"columns": [...], "data": [[...]]}}')
    unknown = set(doc) - {keys[0], "params"} if len(doc) > 1 else None
    if unknown:
        raise bad(f"unknown top-level key '{sorted(unknown)[0]}'")
    payload = doc[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(payload, dict) or "data" not in payload:
            raise bad("dataframe_split must be an object with 'columns' and 'data'")
        columns = payload.get("columns", m.features)
        if columns is m.features or columns == m.features:
            columns = m.features  # the very list: to_matrix need not compare it again
        elif not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise bad("dataframe_split.columns must be a list of feature names")
        return to_matrix(m, payload["data"], columns, max_rows)
    if keys[0] == "dataframe_records":
        return records_to_matrix(m, payload, max_rows)
    if isinstance(payload, dict):  # inputs/instances as columns
        return columns_to_matrix(m, dict(payload), max_rows)
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        return records_to_matrix(m, payload, max_rows)
    return to_matrix(m, payload, m.features, max_rows)
