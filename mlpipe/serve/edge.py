"""The WSGI middleware in front of Flask: the bearer-token check, request metrics, and the prediction
routes served without Flask's per-request context, routing and response objects (the hot path).
Which route a request is, is decided once, by ``routes.match``."""
from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus

import numpy as np
import orjson

from mlpipe.errors import MlpipeError, PayloadTooLarge, Unauthorized
from mlpipe.serve.auth import authorized
from mlpipe.serve.recording import request_id
from mlpipe.serve.routes import match

log = logging.getLogger("mlpipe.serve")


class Edge:
    """``handlers``: a route's view name -> ``handler(environ, body, request_id, t0, **route variables)``
    returning the answer's JSON document, for the routes with ``edge=True``. The Flask views of the
    same routes (requests without a Content-Length) call the same handlers."""

    def __init__(self, app, tokens: list[bytes], mx, models, max_body: int, handlers: dict):
        self.app, self.tokens, self.mx, self.models, self.max_body, self.handlers = app, tokens, mx, models, max_body, handlers

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        route, params = match(environ.get("PATH_INFO", ""))
        if self.tokens and (route is None or not route.public) and not authorized(
                environ.get("HTTP_AUTHORIZATION", ""), self.tokens):
            status, result = self._respond(start_response, 401, {"error": str(Unauthorized(
                "missing or wrong bearer token", hint="send Authorization: Bearer <token>"))}, [("WWW-Authenticate", "Bearer")])
        elif route is not None and route.edge and environ.get("REQUEST_METHOD") in route.methods \
                and environ.get("CONTENT_LENGTH"):
            status, result = self._predict(environ, start_response, self.handlers[route.view], params,
                                           None if environ.get("HTTP_X_MLPIPE_CAPTURE", "").lower() == "off" else t0)
        else:  # through Flask
            seen = []

            def sr(status, headers, exc_info=None):
                seen.append(status)
                return start_response(status, headers, exc_info)
            result = self.app(environ, sr)
            status = int(seen[0][:3]) if seen else None
        if status is not None and (route is None or route.counted):
            self.mx.request(route.rule if route is not None else "unmatched", status,
                            time.perf_counter() - t0, self._model_label(params))
        return result

    def _model_label(self, params: dict) -> str:
        """The model a request went to, for the metrics: a name this host serves, else "" (a client
        must not be able to mint metric series with made-up names)."""
        name = params.get("name")
        if name is not None:
            return name if self.models.get(name) is not None else ""
        only = self.models.only()
        return only.model.name if only is not None and only.model is not None else ""

    def _predict(self, environ, sr, handler, params: dict, t0: float | None):
        rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        extra = [("X-Request-Id", rid)]
        try:
            length = int(environ["CONTENT_LENGTH"])
        except ValueError:
            return self._respond(sr, 400, {"error": "Content-Length is not a number"}, extra)
        try:
            if length > self.max_body:
                raise PayloadTooLarge(f"request body is larger than {self.max_body} bytes; split the request")
            body = environ["wsgi.input"].read(length) if length > 0 else b""
            return self._respond(sr, 200, handler(environ, body, rid, t0, **params), extra)
        except MlpipeError as exc:
            return self._respond(sr, exc.http_status, {"error": str(exc)}, extra)
        except Exception:  # a bug: log it, do not leak it
            log.exception("unexpected error on %s", environ.get("PATH_INFO", ""))
            return self._respond(sr, 500, {"error": "internal error; see the server log"}, extra)

    def _respond(self, sr, status: int, doc: dict, extra: list | None = None) -> tuple[int, list]:
        """(status, the WSGI body) of a JSON answer, started with ``sr``."""
        body = dumps(doc)
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        # the version that answered (the slot may have switched since the prediction started)
        answered = doc.get("model_version") if status == 200 else None
        if answered is not None:
            headers.append(("X-Model-Version", str(answered)))
        else:
            only = self.models.only()
            if only is not None and only.model is not None:
                headers.append(("X-Model-Version", only.model.version_label))
        sr(_STATUS.get(status) or f"{status} {HTTPStatus(status).phrase.upper()}", headers + (extra or []))
        return status, [body]


_STATUS = {s.value: f"{s.value} {s.phrase.upper()}" for s in HTTPStatus}


def dumps(doc) -> bytes:
    """JSON bytes of an answer: orjson (numpy arrays and scalars natively; NaN and infinities become
    null, which JSON has, where json.dumps writes NaN, which it has not), else json.dumps (integers
    beyond 64 bits)."""
    try:
        return orjson.dumps(doc, default=np_default, option=orjson.OPT_SERIALIZE_NUMPY)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(doc, default=np_default).encode()


def np_default(o):
    """``json.dumps``' ``default`` for numpy scalars and arrays."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")
