"""Request ids, this worker's sampled prediction capture (``Capture``, handing rows to
``mlpipe.capture``'s background recorder) and the body of ``POST /feedback``."""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
import socket
import time
from typing import Any

from mlpipe.errors import MlpipeError, PayloadTooLarge
from mlpipe.spec import CAPTURE_DEFAULTS
from mlpipe.serve.model import LoadedModel, Scored
from mlpipe.serve.prometheus import metrics
from mlpipe.serve.validation import bad

log = logging.getLogger("mlpipe.serve")

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


_ID_PREFIX = {"prefix": ""}
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:
    _ID_PREFIX["prefix"] = os.urandom(8).hex()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker draws its own


def request_id(given: str | None) -> str:
    """The client's own id when it is a sane one (X-Request-Id), else a new one: 16 random hex digits
    drawn once per process (a forked worker draws its own), then a counter (an os.urandom call per
    request cost ~15 us, a tenth of a one-row prediction). Unique across processes and restarts; not
    a secret (POST /feedback is behind the same bearer token as the predictions)."""
    if given and REQUEST_ID_RE.match(given):
        return given
    return f"{_ID_PREFIX['prefix']}{next(_ID_COUNTER):08x}"


class Capture:
    """This worker's sampled prediction capture: decides per request whether to record it and hands
    what to record to a ``mlpipe.capture.Recorder`` (bounded queue, background writer). Nothing here
    waits on the database or raises into the request."""

    def __init__(self, cfg: dict):
        self.url = cfg["capture_db"] or None
        self.fixed = cfg["capture_sample"]
        self.host = cfg["host"] or socket.gethostname()
        self.max_age, self.max_rows = cfg["capture_max_age"], cfg["capture_max_rows"]
        self._recorder = None
        self._store = None
        self._broken = False

    def share(self, m: LoadedModel) -> float:
        if self.fixed is not None:
            return self.fixed
        s = m.spec_sample
        if isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1:
            return float(s)
        return float(CAPTURE_DEFAULTS["sample"])  # neither the host nor the version's spec says

    def retention(self, m: LoadedModel) -> tuple[int, int]:
        """(max age in seconds, max rows per model): the host's settings, else the served version's spec."""
        from mlpipe.spec import parse_duration
        spec = (m.manifest.get("spec") or {}).get("capture") or {}
        age, rows = self.max_age, self.max_rows
        if age is None:
            try:
                age = parse_duration(spec.get("max_age"), "capture.max_age") if spec.get("max_age") else None
            except MlpipeError:
                age = None
        if rows is None and isinstance(spec.get("max_rows"), int) and spec["max_rows"] > 0:
            rows = spec["max_rows"]
        return (age or parse_duration(CAPTURE_DEFAULTS["max_age"]), rows or CAPTURE_DEFAULTS["max_rows"])

    def recorder(self, m: LoadedModel):
        if self._recorder is None and not self._broken:
            try:
                from mlpipe import capture
                age, rows = self.retention(m)
                self._recorder = capture.Recorder(capture.db_url(self.url), host=self.host,
                                                  max_age_seconds=age, max_rows=rows)
            except Exception as exc:  # a capture bug must never cost a prediction
                self._broken = True
                log.error("prediction capture is off in this worker: %s", exc)
        return self._recorder

    def offer(self, m: LoadedModel, rid: str, X, labels, t0: float | None) -> None:
        """``t0`` None: not captured (a request that says ``X-Mlpipe-Capture: off``, such as the deploy's
        and the monitor's own checks: synthetic traffic would pass for live traffic)."""
        if t0 is None:
            return
        share = self.share(m)
        if share <= 0 or (share < 1 and random.random() >= share):
            return
        rec = self.recorder(m)
        if rec is None:
            return
        try:
            if type(X) is Scored:  # the linear fast path's rows of floats: the writer makes them a matrix
                X = X.rows
            rec.offer(m.name, m.version, rid, m.features, X, labels, (time.perf_counter() - t0) * 1000.0)
        except Exception as exc:  # documented never to raise; belt and braces on the request path
            log.error("prediction capture failed: %s", exc)

    def stats(self) -> dict | None:
        return self._recorder.stats() if self._recorder is not None else None

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until what is queued was written or dropped (tests, benchmarks)."""
        if self._recorder is not None:
            self._recorder.flush(timeout)
        metrics().flush()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (at most ``timeout`` seconds): a worker that stops loses no captured row
        the database would take."""
        if self._recorder is not None:
            try:
                self._recorder.close(timeout=timeout)
            except Exception as exc:
                log.error("prediction capture: rows still queued at exit were lost: %s", exc)

    def store(self):
        """The store POST /feedback writes to: with the writer's short PostgreSQL timeouts, since a
        sync worker waiting on a locked table is a worker that serves no prediction."""
        if self._store is None:
            from mlpipe import capture
            self._store = capture.Store(capture.db_url(self.url), statement_timeout=capture.WRITE_TIMEOUT,
                                        lock_timeout=capture.WRITE_TIMEOUT)
        return self._store


_FEEDBACK_MAX = 10000


def parse_feedback(doc) -> list[tuple[str, int, Any]]:
    """``{"request_id": ..., "label": ..., "row": 0}`` or a list of them -> [(request_id, row, label)]."""
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise bad("no labels in the body", hint='send {"request_id": "...", "label": ...} or a list of those')
    if len(items) > _FEEDBACK_MAX:
        raise PayloadTooLarge(f"{len(items)} labels is more than one request takes ({_FEEDBACK_MAX})",
                              hint="split them, or load a file with mlpipe feedback load MODEL FILE")
    out = []
    for i, it in enumerate(items):
        where = f"item {i}" if isinstance(doc, list) else "the body"
        if not isinstance(it, dict):
            raise bad(f"{where} is {type(it).__name__}, expected an object",
                      hint='e.g. {"request_id": "5f3a...", "label": 1}')
        unknown = set(it) - {"request_id", "label", "row", "model"}
        if unknown:
            raise bad(f"{where} has unknown key(s) {', '.join(sorted(unknown))}",
                      hint="keys: request_id, label, row (optional, default 0)")
        rid, label, row = it.get("request_id"), it.get("label"), it.get("row", 0)
        if not isinstance(rid, str) or not REQUEST_ID_RE.match(rid):
            raise bad(f"{where}: request_id must be the id a prediction answered with (X-Request-Id), got "
                      f"{json.dumps(rid)[:70]}")
        if label is None or not isinstance(label, (str, int, float, bool)) or (
                isinstance(label, float) and not math.isfinite(label)):
            raise bad(f"{where}: label must be a string or a finite number, got {json.dumps(label)[:70]}")
        if isinstance(row, bool) or not isinstance(row, int) or row < 0:
            raise bad(f"{where}: row must be a non-negative integer (the row of a multi-row request), got {row!r}")
        out.append((rid, row, label))
    return out


def check_labels(m, items: list[tuple[str, int, Any]]) -> None:
    """Labels must fit the served model: a class it knows (classifiers), a finite number (regressors).
    One client's "yes" among 0/1 would otherwise stop every retrain that learns from the labels."""
    for i, (rid, _, label) in enumerate(items):
        where = f"label {json.dumps(label)[:40]} for {rid}"
        if m.kind == "regression":
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                raise bad(f"{where}: {m.name} is a regressor, its labels are numbers")
        elif m.classes and label not in m.classes or isinstance(label, bool) != any(isinstance(c, bool) for c in m.classes):
            shown = ", ".join(json.dumps(c) for c in m.classes[:20])
            raise bad(f"{where} is not a class of {m.name} v{m.version} ({shown})",
                      hint="send one of the model's classes; a model name in the body sends labels to another model")
