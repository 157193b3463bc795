"""The Open Inference Protocol v2: an infer request (JSON tensors, or binary tensor data) -> the
model's matrix, the outputs asked for and the client's id."""
from __future__ import annotations

import math

import numpy as np

from mlpipe.errors import PayloadTooLarge
from mlpipe.serve.model import NUMERIC_OIP, OIP_NP, LoadedModel
from mlpipe.serve.validation import bad, check_rows, finite_check, parse_json, scored, takes, to_matrix


def parse_infer(m: LoadedModel, body: bytes, header_length: str | None, max_rows: int):
    """Open Inference Protocol v2 request -> (matrix, requested output names, request id)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
            if not 0 < n <= len(body):
                raise ValueError
        except ValueError:
            raise bad("Inference-Header-Content-Length is not a length within the body") from None
        body, binary = body[:n], body[n:]
    doc = parse_json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise bad("an infer request is an object with a non-empty 'inputs' list",
                  hint='e.g. {"inputs": [{"name": "...", "shape": [1], "datatype": "FP64", "data": [1.0]}]}')
    if m.linear is not None and not binary:
        fast = _scored_infer(m, doc, max_rows)
        if fast is not None:
            return fast
    offset = 0
    tensors = []
    for i, t in enumerate(doc["inputs"]):
        if not isinstance(t, dict):
            raise bad(f"inputs[{i}] must be an object")
        name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str):
            raise bad(f"inputs[{i}].name must be a string")
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise bad(f"input '{name}': shape must be a list of non-negative integers")
        if not isinstance(datatype, str) or (datatype not in OIP_NP and datatype != "BYTES"):
            raise bad(f"input '{name}': unknown datatype {datatype!r}", hint=f"use one of {', '.join(sorted(OIP_NP))} or BYTES")
        count = math.prod(shape)
        if count > max_rows * max(len(m.features), 1):
            raise PayloadTooLarge(f"input '{name}' has {count} values, more than this server takes")
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad(f"input '{name}': parameters must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if datatype == "BYTES" or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise bad(f"input '{name}': binary_data_size does not match the binary part of the body")
            dt = np.dtype(OIP_NP[datatype]).newbyteorder("<")
            if size != count * dt.itemsize:
                raise bad(f"input '{name}': {size} bytes do not hold shape {shape} of {datatype}")
            arr = np.frombuffer(binary[offset:offset + size], dtype=dt).reshape(shape)
            offset += size
        else:
            if "data" not in t:
                raise bad(f"input '{name}' has no 'data'")
            data = t["data"]
            if not isinstance(data, list):
                data = [data]
            if datatype == "BYTES":
                arr = np.asarray(data, dtype=object)
            else:
                try:
                    flat = np.asarray(data, dtype=np.float64 if datatype.startswith("FP") else None)
                except (ValueError, TypeError):
                    raise bad(f"input '{name}': data must be numbers for {datatype}") from None
                if flat.dtype.kind not in "fiub":
                    raise bad(f"input '{name}': data must be numbers for {datatype}")
                if flat.size != count:
                    raise bad(f"input '{name}': {flat.size} values do not fit shape {shape}")
                arr = flat.reshape(shape)
        tensors.append((name, datatype, arr))
    outputs = requested_outputs(m, doc)
    request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    # one 2-D tensor holding every feature, or one tensor per feature
    if len(tensors) == 1 and tensors[0][0] not in m.index:
        name, datatype, arr = tensors[0]
        if arr.ndim != 2 or arr.shape[1] != len(m.features):
            raise bad(f"input '{name}' is not a feature name, so it must be a 2-D tensor [rows, {len(m.features)}]; "
                      f"got shape {list(arr.shape)}", hint=f"or send one tensor per feature: {', '.join(m.features[:5])}, ...")
        check_rows(arr.shape[0], max_rows)
        if m.numeric:
            if datatype == "BYTES":
                raise bad(f"input '{name}': BYTES given, this model takes numbers")
            X = arr.astype(np.float64)
            finite_check(m, X)
            return X, outputs, request_id
        return to_matrix(m, arr.tolist(), m.features, max_rows), outputs, request_id
    columns = {}
    for name, datatype, arr in tensors:
        if name not in m.index:
            raise bad(f"unknown input '{name}'", hint=takes(m))
        expected = m.datatypes[m.index[name]]
        if (expected in NUMERIC_OIP) != (datatype in NUMERIC_OIP):
            raise bad(f"input '{name}' has datatype {datatype}, expected {expected}")
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise bad(f"input '{name}' must have shape [rows] or [rows, 1], got {list(arr.shape)}")
        columns[name] = arr
    missing = [f for f in m.features if f not in columns]
    if missing:
        raise bad(f"missing input '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                  hint=takes(m))
    lengths = {len(a) for a in columns.values()}
    if len(lengths) != 1:
        raise bad(f"inputs have different numbers of rows ({sorted(lengths)})")
    check_rows(lengths.pop(), max_rows)
    if m.numeric:
        X = np.column_stack([columns[f].astype(np.float64) for f in m.features])
        finite_check(m, X)
        return X, outputs, request_id
    rows = [list(r) for r in zip(*[columns[f].tolist() for f in m.features])]
    return to_matrix(m, rows, m.features, max_rows), outputs, request_id


def requested_outputs(m: LoadedModel, doc: dict) -> list[str] | None:
    """The output names an infer request asks for (None: the default, predict)."""
    if doc.get("outputs") is None:
        return None
    if not isinstance(doc["outputs"], list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in doc["outputs"]):
        raise bad("'outputs' must be a list of objects with a 'name'")
    outputs = [o["name"] for o in doc["outputs"]]
    allowed = {"predict", "predict_proba"} if m.kind == "classification" else {"predict"}
    unknown = [o for o in outputs if o not in allowed]
    if unknown:
        raise bad(f"unknown output '{unknown[0]}'", hint=f"this model has: {', '.join(sorted(allowed))}")
    return outputs


def _scored_infer(m: LoadedModel, doc: dict, max_rows: int):
    """The linear fast path (mlpipe.linear) for the common small request: one FP64/FP32 tensor of
    JSON data with shape [rows, features], predict only. None for anything else (or when the scorer
    declines the values): the general parser above then checks the request as always."""
    inputs = doc["inputs"]
    if len(inputs) != 1:
        return None
    t = inputs[0]
    if type(t) is not dict or t.get("parameters") or t.get("datatype") not in ("FP64", "FP32"):
        return None
    name, shape, data = t.get("name"), t.get("shape"), t.get("data")
    n = len(m.features)
    if type(name) is not str or name in m.index or type(shape) is not list or len(shape) != 2 or shape[1] != n \
            or type(shape[0]) is not int or type(shape[1]) is not int or type(data) is not list or len(data) != shape[0] * n:
        return None
    outputs = doc.get("outputs")
    if outputs is not None:  # predict only; anything else (or a malformed list) is the general path's
        if type(outputs) is not list or not all(type(o) is dict and o.get("name") == "predict" for o in outputs):
            return None
        outputs = ["predict"] * len(outputs)
    fast = scored(m, [data[i:i + n] for i in range(0, len(data), n)] if n else [], max_rows)
    if fast is None:
        return None
    return fast, outputs, doc.get("id") if isinstance(doc.get("id"), str) else None
