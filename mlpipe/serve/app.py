"""``create_app``: the Flask app of one worker (its model slot, capture, error answers and views), its
routes registered from ``routes.ROUTES``, behind the ``Edge``."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from mlpipe import __version__, hostdir
from mlpipe.errors import MlpipeError, NotFound, NotReady, Unauthorized, UnsupportedMediaType
from mlpipe.serve.config import load_config
from mlpipe.serve.edge import Edge, dumps
from mlpipe.serve.invocations import parse_invocations
from mlpipe.serve.model import LoadedModel, Models
from mlpipe.serve.oip import parse_infer
from mlpipe.serve.openapi import openapi
from mlpipe.serve.prometheus import metrics, render_metrics
from mlpipe.serve.recording import Capture, check_labels, parse_feedback, request_id
from mlpipe.serve.routes import ROUTES
from mlpipe.serve.validation import bad, parse_json

log = logging.getLogger("mlpipe.serve")


def create_app(config: dict | None = None):
    from flask import Flask, Response, request
    from werkzeug.exceptions import HTTPException

    cfg = load_config(config)
    app = Flask("mlpipe")
    app.config["MAX_CONTENT_LENGTH"] = cfg["max_body_bytes"]
    models = Models(cfg["require_onnx"], model_dir=cfg["model_dir"] or None, models_dir=cfg["models_dir"] or None)
    models.load()
    models.watch()  # a switched 'current' link, a model folder added or removed: served without a reload
    app.extensions["mlpipe"] = models
    tokens = [t.encode() for t in cfg["auth_tokens"]]
    max_rows = cfg["max_rows"]
    mx = metrics()
    cap = Capture(cfg)
    mx.capture_source = cap

    def loaded(slot, name: str | None = None) -> LoadedModel:
        if slot.model is None:
            raise NotReady(f"no model is loaded{' for ' + repr(name) if name else ''}: {slot.error}",
                           hint=None if hostdir.current(slot.model_dir) is None else
                           "every candidate version was refused (above): pull and activate a good version (the server "
                           "follows the 'current' link; no reload needed)")
        return slot.model

    def only_slot():
        """The slot of the routes that name no model: the host's one model."""
        slot = models.only()
        if slot is not None:
            return slot
        names = models.names()
        if not names:
            raise NotReady(f"no model is served: nothing is pulled into {models.root}",
                           hint=f"run `mlpipe models pull NAME@production --dest {models.root}/NAME --activate`; "
                                "the server starts serving it within a second")
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise bad(f"this server serves {len(names)} models ({shown}): name one in the path",
                  hint="POST /models/<name>/invocations, or /v2/models/<name>/infer")

    def model() -> LoadedModel:
        return loaded(only_slot())

    def json_response(obj, status=200, headers=None):
        resp = Response(dumps(obj), status=status, mimetype="application/json")
        if headers:
            resp.headers.update(headers)
        answered = obj.get("model_version") if status == 200 and isinstance(obj, dict) else None
        only = models.only()
        if answered is not None:  # the version that answered, though the slot may have switched since
            resp.headers["X-Model-Version"] = str(answered)
        elif only is not None and only.model is not None:
            resp.headers["X-Model-Version"] = only.model.version_label
        return resp

    @app.errorhandler(MlpipeError)
    def _mlpipe_error(exc: MlpipeError):
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
        if "mlpipe.request_id" in request.environ:
            headers["X-Request-Id"] = request.environ["mlpipe.request_id"]
        return json_response({"error": str(exc)}, exc.http_status, headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        msg = {413: f"request body is larger than {cfg['max_body_bytes']} bytes; split the request",
               404: f"no such endpoint {request.path}; see /openapi.json",
               405: f"method {request.method} is not allowed on {request.path}"}.get(exc.code, exc.description)
        return json_response({"error": msg}, exc.code)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # a bug: log it, do not leak it
        log.exception("unexpected error on %s", request.path)
        return json_response({"error": "internal error; see the server log"}, 500)

    # --- health and server metadata
    def live():
        return json_response({"live": True})

    def ready():
        """Ready when every model of the host is loaded (the balancer's per-model health checks use
        /v2/models/<name>/ready instead, so that one model's trouble takes no other out)."""
        slots = models.slots
        only = models.only()
        if only is not None:
            if only.model is None:
                return json_response({"ready": False, "error": only.error}, 503)
            return json_response({"ready": True, "model": only.model.name, "version": only.model.version})
        if not slots:
            return json_response({"ready": False, "error": f"no model is served: nothing is pulled into {models.root}"}, 503)
        doc = {n: ({"version": s.model.version} if s.model is not None else {"error": s.error}) for n, s in sorted(slots.items())}
        ok = all(s.model is not None for s in slots.values())
        return json_response({"ready": ok, "models": doc}, 200 if ok else 503)

    def ping():
        only = models.only()
        if only is not None and only.model is None:
            return json_response({"error": only.error}, 503)
        if only is None and (not models.slots or any(s.model is None for s in models.slots.values())):
            return ready()
        return "\n", 200

    def version():
        return Response(__version__, mimetype="text/plain")

    def server_meta():
        return json_response({"name": "mlpipe", "version": __version__, "extensions": ["binary_tensor_data"],
                              "follows_current": models.watching})

    def slot_for(name: str):
        slot = models.get(name)
        if slot is None:
            names = models.names() if models.root is not None else [
                s.model.name for s in models.slots.values() if s.model is not None]
            raise NotFound(f"unknown model {name!r}", hint=f"this server serves {', '.join(repr(n) for n in names[:20]) or 'no model'}")
        return slot

    def _model_for(name: str, version: str | None = None) -> LoadedModel:
        m = loaded(slot_for(name), name)
        if version is not None and version != m.version_label:
            raise NotFound(f"model '{name}' version {version} is not served here", hint=f"this server serves version {m.version}")
        return m

    def model_meta(name, version=None):
        m = _model_for(name, version)
        outputs = [{"name": "predict", "datatype": m.target_datatype, "shape": [-1]}]
        if m.kind == "classification":
            outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(m.classes)]})
        return json_response({"name": m.name, "versions": [m.version_label],
                              "platform": "onnxruntime_onnx" if m.runtime == "onnxruntime" else "sklearn",
                              "inputs": [{"name": f, "datatype": d, "shape": [-1]} for f, d in zip(m.features, m.datatypes)],
                              "outputs": outputs,
                              "parameters": {"classes": m.classes, "kind": m.kind}})

    def model_ready(name, version=None):
        m = _model_for(name, version)
        return json_response({"name": m.name, "ready": True})

    # the prediction routes' handlers, called by the Edge (and by Flask for a body without Content-Length)
    def infer_core(environ, body: bytes, rid: str, t0: float | None, name: str, version: str | None = None) -> dict:
        m = _model_for(name, version)
        X, outputs, oip_id = parse_infer(m, body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"), max_rows)
        want_proba = outputs is not None and "predict_proba" in outputs
        labels, probs = m.predict(X, proba=want_proba)
        mx.predictions(m, labels)
        cap.offer(m, rid, X, labels, t0)
        out = []
        if outputs is None or "predict" in outputs:
            labels_list = labels if type(labels) is list else np.asarray(labels).tolist()
            out.append({"name": "predict", "datatype": m.target_datatype if m.kind == "classification" else "FP64",
                        "shape": [len(labels_list)], "data": labels_list})
        if want_proba and probs is not None:
            p = np.asarray(probs, dtype=np.float64)
            out.append({"name": "predict_proba", "datatype": "FP64", "shape": list(p.shape), "data": p.ravel().tolist()})
        # OIP's own "id" echoes the client's; request_id is what POST /feedback takes
        return {"model_name": m.name, "model_version": m.version_label, "id": rid if oip_id is None else oip_id,
                "request_id": rid, "outputs": out}

    def invocations_core(environ, body: bytes, rid: str, t0: float | None, name: str | None = None) -> dict:
        m = model() if name is None else loaded(slot_for(name), name)
        X = parse_invocations(m, environ.get("CONTENT_TYPE", ""), body, max_rows)
        labels, _ = m.predict(X)
        mx.predictions(m, labels)
        cap.offer(m, rid, X, labels, t0)
        return {"predictions": labels if type(labels) is list else np.asarray(labels).tolist(),
                "model_version": m.version_label, "request_id": rid}

    def _t0() -> float | None:
        return None if request.headers.get("X-Mlpipe-Capture", "").lower() == "off" else time.perf_counter()

    def _rid() -> str:
        rid = request.environ.get("mlpipe.request_id")
        if rid is None:
            rid = request.environ["mlpipe.request_id"] = request_id(request.headers.get("X-Request-Id"))
        return rid

    def via_flask(handler):
        def view(**params):
            t0, rid = _t0(), _rid()
            return json_response(handler(request.environ, request.get_data(cache=False), rid, t0, **params),
                                 headers={"X-Request-Id": rid})
        return view

    def feedback():
        if not request.is_json and request.mimetype not in ("", "application/json"):
            raise UnsupportedMediaType(f"POST /feedback takes application/json, got {request.mimetype}",
                                       hint='send {"request_id": "...", "label": ...} or a list of those')
        doc = parse_json(request.get_data(cache=False))
        items = parse_feedback(doc)
        name = (doc.get("model") if isinstance(doc, dict) else None) or model().name
        from mlpipe.registry import check_name
        try:
            check_name(name)
        except MlpipeError as exc:
            raise bad(str(exc)) from None
        target = models.get(name)
        if target is not None and target.model is not None:
            check_labels(target.model, items)
        try:
            result = cap.store().attach_labels(name, items, source="http")
        except NotReady as exc:
            raise NotReady(f"the labels were not stored: {exc.message}", hint=exc.hint) from None
        except MlpipeError:
            raise
        except Exception as exc:
            log.error("POST /feedback: the capture database failed: %s", exc)
            raise NotReady("the capture database is unavailable; the labels were not stored",
                           hint="send them again later, or load them with mlpipe feedback load MODEL FILE") from None
        return json_response({"model": name, **result})

    def metadata(name: str | None = None):
        slot = only_slot() if name is None else slot_for(name)
        m = loaded(slot, name)
        man = {k: v for k, v in m.manifest.items() if k != "spec"}
        return json_response({**man, "runtime": m.runtime, "model_dir": str(slot.model_dir),
                              "loaded_at": m.loaded_at, "load_error": slot.error, "pid": os.getpid(),
                              "follows_current": models.watching})

    def openapi_doc():
        only = models.only()
        return json_response(openapi(only.model if only is not None else None))

    def prom():
        data, ctype = render_metrics()
        return Response(data, mimetype=ctype.split(";")[0], headers={"Content-Type": ctype})

    handlers = {"invocations": invocations_core, "infer": infer_core}
    views = {f.__name__: f for f in (live, ready, ping, version, server_meta, model_meta, model_ready, feedback,
                                     metadata, openapi_doc, prom)}
    views["model_metadata"] = metadata
    views.update({name: via_flask(h) for name, h in handlers.items()})
    for r in ROUTES:
        app.add_url_rule(r.rule, r.view, views[r.view], methods=list(r.methods))
    app.wsgi_app = Edge(app.wsgi_app, tokens, mx, models, cfg["max_body_bytes"], handlers)
    return app
