"""The one routing table. Flask registers its routes from it; the Edge matches every request against
it to check the token (public routes), to serve the prediction routes itself and to label metrics."""
from __future__ import annotations

import re
from typing import NamedTuple


class Route(NamedTuple):
    rule: str                 # Flask's syntax; also the request's metrics label
    methods: tuple[str, ...]
    view: str                 # the view's name in app.py (the Edge's handler for edge routes)
    public: bool = False      # answered without a bearer token
    edge: bool = False        # a prediction route: served by the Edge, not through Flask (the hot path)
    counted: bool = True      # in mlpipe_requests_total / mlpipe_request_seconds (a scrape is not traffic)


GET, POST = ("GET",), ("POST",)
ROUTES = (
    Route("/v2/health/live", GET, "live", public=True),
    Route("/v2/health/ready", GET, "ready", public=True),
    Route("/health", GET, "ready", public=True),
    Route("/ping", GET, "ping", public=True),
    Route("/metrics", GET, "prom", public=True, counted=False),
    Route("/version", GET, "version"),
    Route("/v2", GET, "server_meta"),
    Route("/metadata", GET, "metadata"),
    Route("/openapi.json", GET, "openapi_doc"),
    Route("/feedback", POST, "feedback"),
    Route("/invocations", POST, "invocations", edge=True),
    Route("/models/<name>/invocations", POST, "invocations", edge=True),
    Route("/models/<name>/metadata", GET, "model_metadata"),
    Route("/v2/models/<name>", GET, "model_meta"),
    Route("/v2/models/<name>/versions/<version>", GET, "model_meta"),
    # public like the server's own health: the balancer's per-model health check sends no token
    Route("/v2/models/<name>/ready", GET, "model_ready", public=True),
    Route("/v2/models/<name>/versions/<version>/ready", GET, "model_ready", public=True),
    Route("/v2/models/<name>/infer", POST, "infer", edge=True),
    Route("/v2/models/<name>/versions/<version>/infer", POST, "infer", edge=True),
)

_FIXED = {r.rule: r for r in ROUTES if "<" not in r.rule}
_BY_LAST: dict[str, list] = {}   # a rule's last part ("" when that is a variable) -> [(route, regex)]
for _r in ROUTES:
    if "<" in _r.rule:
        _last = _r.rule.rpartition("/")[2]
        _BY_LAST.setdefault("" if _last[:1] == "<" else _last, []).append(
            (_r, re.compile(re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", _r.rule) + r"\Z")))
_NONE: dict = {}


def match(path: str) -> tuple[Route | None, dict]:
    """The route of a request path and its variables (``name``, ``version``), or (None, {}). A variable
    is one non-empty path segment, as in Flask's default converter; a rule ending in a fixed part
    is tried first, as Flask prefers the more specific rule."""
    route = _FIXED.get(path)
    if route is not None:
        return route, _NONE
    for candidates in (_BY_LAST.get(path.rpartition("/")[2]), _BY_LAST[""]):
        for route, regex in candidates or ():
            m = regex.match(path)
            if m is not None:
                return route, m.groupdict()
    return None, _NONE


def route_label(path: str) -> str:
    """A bounded label for a request path (a client must not be able to mint metric series)."""
    route = match(path)[0]
    return route.rule if route is not None else "unmatched"
