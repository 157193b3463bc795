"""The model server: a REST API generated from a model's manifest, as a Flask app factory run by
gunicorn (``gunicorn -c python:mlpipe.gunicorn_conf 'mlpipe.serve:create_app()'``).

Endpoints: Open Inference Protocol v2 (``/v2/...``), the MLflow scoring protocol (``/invocations``,
``/ping``, ``/version``), ``/metadata``, ``/openapi.json``, ``/metrics`` and ``POST /feedback``;
``routes.py`` lists them all. Every prediction answer carries a request id; a sampled share is
captured in the background (``recording.py``), never slowing or failing a prediction. Each worker
serves ``<model_dir>/current`` once its sha256 checks out, else the last version that loaded, or,
with ``models_dir``, every model folder under it by name (``model.py``); a switched ``current`` link,
a model added or removed, is followed without a reload.

Files: ``config`` (settings), ``model`` (loading, the model slot), ``routes`` (the routing table),
``edge`` (the WSGI fast path: token, metrics, predictions), ``auth`` (bearer tokens), ``app``
(``create_app``: Flask views), ``invocations`` and ``oip`` (each protocol's request parsing),
``validation`` (checks both share), ``recording`` (request ids, capture, feedback bodies),
``prometheus`` (metrics), ``openapi`` (the API document).
"""
from mlpipe.serve.app import create_app
from mlpipe.serve.auth import authorized
from mlpipe.serve.config import DEFAULTS, ENV, load_config
from mlpipe.serve.edge import Edge
from mlpipe.serve.invocations import columns_to_matrix, parse_invocations, records_to_matrix
from mlpipe.serve.model import LAST_GOOD, LoadedModel, Models, ModelSlot
from mlpipe.serve.oip import parse_infer
from mlpipe.serve.prometheus import LATENCY_BUCKETS, VALUE_BUCKETS, _observe_many, metrics, render_metrics  # noqa: F401
from mlpipe.serve.recording import (REQUEST_ID_RE, Capture,
                                    parse_feedback, request_id)
from mlpipe.serve.routes import ROUTES, Route, match, route_label
from mlpipe.serve.validation import to_matrix

__all__ = ["DEFAULTS", "ENV", "LAST_GOOD", "LATENCY_BUCKETS",
           "REQUEST_ID_RE", "ROUTES", "VALUE_BUCKETS", "Capture", "Edge", "LoadedModel", "Models", "ModelSlot", "Route",
           "authorized", "columns_to_matrix", "create_app", "load_config", "match", "metrics", "parse_feedback",
           "parse_infer", "parse_invocations", "records_to_matrix", "render_metrics", "request_id", "route_label",
           "to_matrix"]
