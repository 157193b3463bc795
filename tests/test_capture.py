"""Prediction capture against real databases: a SQLite file and a PostgreSQL server started by the
tests (tests/postgres.py). No timing assertions: waits poll with generous deadlines."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
import uuid

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from mlpipe import capture, data
from mlpipe.cli_capture import feedback, predictions
from mlpipe.errors import DataError, NotReady, UsageError
from postgres import MISSING, bin_dir, postgres_server
from procs import free_port

FEATURES = ["mean radius", "mean texture"]


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL child process for this module's tests (tests/postgres.py)."""
    if bin_dir() is None:
        pytest.fail(MISSING)
    with postgres_server() as server:
        yield server


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """An empty capture database: a SQLite file in a folder that does not exist yet, or a fresh
    database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/not-yet/capture.db"
    pg = request.getfixturevalue("pg_server")
    return pg.create_database(f"t_{uuid.uuid4().hex[:12]}")


def row(request_id, model="credit-risk", version=1, ts=None, r=0, inputs=None, prediction=1, host="h1"):
    return {"request_id": request_id, "row": r, "model": model, "version": version, "host": host,
            "ts": time.time() if ts is None else ts, "latency_ms": 1.25,
            "inputs": inputs if inputs is not None else {"mean radius": np.float64(14.5), "mean texture": 20},
            "prediction": prediction}


def labels_in(url: str) -> int:
    engine = sa.create_engine(capture.Store(url).engine.url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM mlpipe_feedback")).scalar_one()
    finally:
        engine.dispose()


# -- the URL ------------------------------------------------------------------------------------
def test_db_url(monkeypatch, tmp_path):
    monkeypatch.delenv("MLPIPE_CAPTURE_DB", raising=False)
    monkeypatch.setenv("MLPIPE_FLEET_ROOT", str(tmp_path / "root"))
    assert capture.db_url() == f"sqlite:///{tmp_path}/root/capture/capture.db"
    monkeypatch.delenv("MLPIPE_FLEET_ROOT")
    assert capture.db_url() == f"sqlite:///{os.path.expanduser('~')}/.mlpipe/capture/capture.db"
    monkeypatch.setenv("MLPIPE_CAPTURE_DB", "postgresql://u:secret@db/x")
    assert capture.db_url() == "postgresql://u:secret@db/x"
    assert capture.db_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    assert capture.redact(capture.db_url()) == "postgresql://u:***@db/x"


def test_unusable_urls():
    with pytest.raises(UsageError, match="not a SQLAlchemy URL"):
        capture.Store("not a url")
    with pytest.raises(UsageError, match="only SQLite and PostgreSQL"):
        capture.Store("mysql://u@h/db")


def test_reading_a_missing_sqlite_file_creates_nothing(tmp_path):
    store = capture.Store(f"sqlite:///{tmp_path}/nope/capture.db")
    assert store.count("m") == 0 and store.predictions("m").empty and store.prune(1, 1) == 0
    assert not (tmp_path / "nope").exists()


# -- the store ----------------------------------------------------------------------------------
def test_write_read_round_trip(db):
    store = capture.Store(db)
    now = time.time()
    rows = [row("a", ts=now - 30, prediction=np.int64(0)),
            row("b", ts=now - 20, version=2, inputs={"mean radius": 20.0, "mean texture": float("nan")}),
            row("b", ts=now - 20, version=2, r=1, inputs={"mean radius": 21.0, "mean texture": 9.5}, prediction=0),
            row("c", ts=now - 10, model="other", prediction="setosa")]
    assert store.write(rows) == 4
    store.write([row("a", ts=now, prediction=1)])  # the same request id and row: kept as it was
    frame = store.predictions("credit-risk")
    assert list(frame.columns) == ["request_id", "row", "model", "version", "host", "ts", "latency_ms",
                                   *FEATURES, "prediction", "label"]
    assert list(frame["request_id"]) == ["a", "b", "b"] and list(frame["row"]) == [0, 0, 1]
    assert list(frame["prediction"]) == [0, 1, 0] and frame["label"].isna().all()
    assert frame["mean radius"].tolist() == [14.5, 20.0, 21.0] and np.isnan(frame["mean texture"][1])
    assert frame["ts"][0] == pytest.approx(now - 30) and frame["host"][0] == "h1" and frame["latency_ms"][0] == 1.25
    newest = store.predictions("credit-risk", limit=2)  # newest first
    assert list(zip(newest["request_id"], newest["row"])) == [("b", 1), ("b", 0)]
    assert list(store.predictions("credit-risk", version=1)["request_id"]) == ["a"]
    assert list(store.predictions("credit-risk", since=now - 25)["request_id"]) == ["b", "b"]
    assert list(store.predictions("credit-risk", until=now - 25)["request_id"]) == ["a"]
    assert store.count("credit-risk") == 3 and store.count("credit-risk", since=now - 25) == 2
    assert store.predictions("other")["prediction"].tolist() == ["setosa"]
    assert store.predictions("nobody").empty


def _frame_the_slow_way(store, model, **kw):
    """What Store.predictions returned before it read in chunks: records() -> one DataFrame."""
    recs = store.records(model, **kw)
    meta = ("request_id", "row", "model", "version", "host", "ts", "latency_ms")
    frame = pd.DataFrame({k: [r[k] for r in recs] for k in meta})
    inputs = pd.DataFrame.from_records([r["inputs"] for r in recs])
    inputs.columns = [f"input.{c}" if c in meta or c in ("prediction", "label") else c for c in inputs.columns]
    tail = pd.DataFrame({"prediction": [r["prediction"] for r in recs], "label": [r["label"] for r in recs]})
    return pd.concat([frame, inputs, tail], axis=1)


def test_predictions_read_in_chunks_is_the_same_frame(db, monkeypatch):
    """Chunks of 7 rows: a NaN input (not JSON lines pyarrow takes: that chunk goes through
    json.loads), text and boolean features, a feature only later rows have, one named like a column,
    a label on some rows, class and numeric predictions."""
    monkeypatch.setattr(capture, "READ_CHUNK", 7)
    store = capture.Store(db)
    now = time.time()
    rows = []
    for i in range(40):
        inputs = {"mean radius": i * 0.5, "mean texture": i, "kind": "ab"[i % 2], "flag": i % 3 == 0}
        if i == 9:
            inputs["mean radius"] = float("nan")
        if i >= 30:
            inputs["ts"] = 7.5
        rows.append(row(f"q{i:02d}", ts=now - 100 + i, inputs=inputs, prediction="ab"[i % 2] if i < 35 else i / 3,
                        host=f"h{i % 3}"))
    store.write(rows)
    store.attach_labels("credit-risk", [(f"q{i:02d}", 0, i % 2) for i in range(0, 40, 3)], "test")
    for kw in ({}, {"limit": 12}, {"labelled": True}, {"labelled": False}, {"since": now - 75, "version": 1}):
        got, want = store.predictions("credit-risk", **kw), _frame_the_slow_way(store, "credit-risk", **kw)
        assert list(got.columns) == list(want.columns), kw
        pd.testing.assert_frame_equal(got, want, obj=str(kw))
    frame = store.predictions("credit-risk")
    assert list(frame.columns)[-4:] == ["flag", "input.ts", "prediction", "label"]
    assert np.isnan(frame["mean radius"][9]) and frame["mean radius"][10] == 5.0


def test_inputs_as_json_whole_requests_at_a_time():
    """The writer's column-wise JSON holds what json.dumps of one dict per row gives, in the same order."""
    def slow(features, X):
        if isinstance(X, pd.DataFrame):
            return [capture.dumps(r) for r in X.to_dict("records")]
        return [capture.dumps(dict(zip(features, r))) for r in (X.tolist() if hasattr(X, "tolist") else X)]
    names = ["a", "b%", 'q"uote', "\u00fcn\u00ef"]
    cases = [
        (names, np.array([[1.0, np.nan, np.inf, -np.inf], [1e-300, 1e300, -0.0, 3.0], [0.1, 2.5, 1e16, 1 / 3]])),
        (names, np.array([[1, 2, 3, 4]], dtype=np.int64)),
        (names, np.array([[1, 0, 1, 0]], dtype=bool)),
        (["nan", "inf"], np.array([[1.0, 2.0], [np.nan, 1.0]])),   # names that look like non-finite floats
        (names, [[1, "x", None, 2.5]]),
        (None, pd.DataFrame({"a": [1.5, np.nan], "b": ["x", None], "c": [1, 2], "d": [True, False],
                             "e": pd.to_datetime(["2020-01-01", "2021-01-01"]), "f": pd.Categorical(["u", "v"])})),
        (None, pd.DataFrame({"a": [1.5, 2.0], "b": pd.array([None, 3], dtype="Int64")})),
    ]
    def parsed(texts):  # the same JSON (orjson keeps non-ASCII names unescaped), nan compared as text
        return [[(k, repr(v)) for k, v in json.loads(t).items()] for t in texts]
    for features, X in cases:
        fast = capture._inputs_json(features, X)
        assert parsed(fast) == parsed(slow(features, X))
        assert all(isinstance(t, str) for t in fast)
    values = [1, 2.5, float("nan"), float("-inf"), "x", None, True, np.int64(3), "x", "caf\u00e9"]
    assert capture._json_texts(values) == [None if v is None else capture.dumps(v) for v in values]


def test_labels_attach_replace_and_unmatched(db):
    store = capture.Store(db)
    store.write([row("a"), row("b"), row("b", r=1), row("x", model="other")])
    assert store.attach_labels("credit-risk", [("a", 0, 1), ("b", 1, "malignant"), ("zzz", 0, 0), ("x", 0, 1)],
                               source="test") == {"stored": 4, "matched": 2, "unmatched": 2}
    labelled = store.predictions("credit-risk", labelled=True)
    assert dict(zip(zip(labelled["request_id"], labelled["row"]), labelled["label"])) == {("a", 0): 1, ("b", 1): "malignant"}
    assert list(store.predictions("credit-risk", labelled=False)["request_id"]) == ["b"]
    # a later label replaces the earlier one, also within one call
    assert store.attach_labels("credit-risk", [("a", 0, 0), ("a", 0, 2.5)], source="again") == \
        {"stored": 1, "matched": 1, "unmatched": 0}
    assert store.records("credit-risk", labelled=True)[0]["label"] == 2.5
    for bad in [("a", 0, None), ("a", -1, 1), ("bad id!", 0, 1), ("a", 0, float("nan")), ("a", 0, [1])]:
        with pytest.raises(UsageError):
            store.attach_labels("credit-risk", [bad], source="t")


def test_predictions_source(db, monkeypatch):
    monkeypatch.setenv("MLPIPE_CAPTURE_DB", db)
    store = capture.Store(db)
    now = time.time()
    store.write([row(f"r{i}", version=1 + i % 2, ts=now - 100 + i,
                     inputs={"mean radius": float(i), "mean texture": 10.0 + i}) for i in range(10)]
                + [row("old", ts=now - 40 * 86400)])
    store.attach_labels("credit-risk", [(f"r{i}", 0, i % 2) for i in range(6)] + [("old", 0, 1)], source="t")

    ds = data.load("predictions:credit-risk?labelled=true&since=30d")
    assert list(ds.frame.columns) == [*FEATURES, "label"] and ds.rows == 6
    assert ds.frame["mean radius"].tolist() == [0, 1, 2, 3, 4, 5] and ds.frame["label"].tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.source == "predictions:credit-risk?labelled=true&since=30d"
    X, y = data.split_xy(ds, "label")
    assert list(X.columns) == FEATURES and len(y) == 6

    assert data.load("predictions:credit-risk").rows == 11  # every captured row, label NaN when none
    assert data.load("predictions:credit-risk?labelled=true&since=30d&target=y").frame.columns[-1] == "y"
    assert data.load("predictions:credit-risk?labelled=true&since=1d&version=2").frame["mean radius"].tolist() == [1, 3, 5]
    newest = data.load("predictions:credit-risk?since=1h&limit=3").frame  # the newest 3, oldest first
    assert newest["mean radius"].tolist() == [7, 8, 9]
    assert data.load("predictions:credit-risk?labelled=false&since=1h").rows == 4
    with pytest.raises(DataError, match="no labelled captured predictions of nobody"):
        data.load("predictions:nobody?labelled=true")
    with pytest.raises(DataError, match="'mean radius' is also a feature"):
        data.load("predictions:credit-risk?target=mean radius")


@pytest.mark.parametrize("uri, message", [
    ("predictions:", "does not name a model"),
    ("predictions:Credit_Risk", "does not name a model"),
    ("predictions:m?labeled=true", "unknown key 'labeled'"),
    ("predictions:m?labelled=maybe", "labelled='maybe' is not true or false"),
    ("predictions:m?since=30days", "since '30days' is not a duration"),
    ("predictions:m?since=1d&since=2d", "'since' is given twice"),
    ("predictions:m?version=two", "version='two' is not a whole number"),
    ("predictions:m?limit=0", "limit='0' is not a positive whole number"),
    ("predictions:m?target=", "target is empty"),
    ("predictions:m?labelled", "cannot read the query"),
])
def test_predictions_source_checks_its_query(uri, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        data.check_source_uri(uri)
    assert data.redact_source(uri) == uri


def test_predictions_source_on_a_dead_database(monkeypatch):
    monkeypatch.setenv("MLPIPE_CAPTURE_DB", f"postgresql://u:secret@127.0.0.1:{free_port()}/x")
    with pytest.raises(DataError, match="cannot read predictions:m.*capture database postgresql://u:\\*\\*\\*@") as info:
        data.load("predictions:m?labelled=true")
    assert "secret" not in str(info.value)


def test_prune_by_age_and_rows(db):
    store = capture.Store(db)
    now = time.time()
    store.write([row(f"old{i}", ts=now - 10 * 86400 - i) for i in range(5)]
                + [row(f"new{i}", ts=now - i) for i in range(20)]
                + [row(f"o{i}", model="other", ts=now - i) for i in range(3)])
    store.attach_labels("credit-risk", [("old0", 0, 1), ("new0", 0, 1)], source="t")
    assert store.prune(7 * 86400, None) == 5
    assert store.count("credit-risk") == 20 and store.count("other") == 3
    assert store.prune(None, 8) == 12
    kept = store.predictions("credit-risk")
    assert sorted(kept["request_id"]) == sorted(f"new{i}" for i in range(8))  # the newest 8
    assert store.count("other") == 3
    assert store.prune(None, 8) == 0
    assert store.prune(0, None) == 11 and store.count("other") == 0
    assert labels_in(db) == 0  # labels by the same rules


# -- the recorder -------------------------------------------------------------------------------
def offer(rec, request_id, n=2, model="credit-risk", version=3):
    X = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    rec.offer(model, version, request_id, FEATURES, X, np.array([1] * n), 0.42)


def total_dropped(rec) -> int:
    return sum(rec.stats()["dropped"].values())


def test_recorder_captures_off_the_request_path(db):
    rec = capture.Recorder(db, host="web-1", flush_interval=0.05, batch_rows=7)
    try:
        for i in range(50):
            offer(rec, f"req-{i}")
        X = pd.DataFrame({"mean radius": [1.5], "mean texture": ["x"]})  # a DataFrame works too
        rec.offer("credit-risk", 3, "frame", FEATURES, X, ["benign"], 1.0)
        assert rec.flush(60)
        assert rec.stats() == {"captured": 101, "dropped": {"queue_full": 0, "db_error": 0, "invalid": 0, "duplicate": 0}, "queued": 0}
    finally:
        assert rec.close(30)
    recs = capture.Store(db).records("credit-risk")
    assert len(recs) == 101 and {r["host"] for r in recs} == {"web-1"} and {r["version"] for r in recs} == {3}
    first = [r for r in recs if r["request_id"] == "req-0"]
    assert [(r["row"], r["inputs"], r["prediction"]) for r in first] == [
        (0, {"mean radius": 0.0, "mean texture": 1.0}, 1), (1, {"mean radius": 2.0, "mean texture": 3.0}, 1)]
    assert [(r["inputs"], r["prediction"]) for r in recs if r["request_id"] == "frame"] == \
        [({"mean radius": 1.5, "mean texture": "x"}, "benign")]
    rec.offer("credit-risk", 3, "late", FEATURES, np.zeros((1, 2)), [0], 1.0)  # after close: ignored, no error


def test_writer_keeps_to_its_cpu_share(tmp_path):
    """A writer allowed 0.1% of a core rests ~1000x as long as each batch took: traffic that offers
    more rows than that fills the queue and the excess is dropped (queue_full) while offer() returns
    at once; flush() skips the rests and writes what is queued."""
    rec = capture.Recorder(f"sqlite:///{tmp_path}/c.db", host="h", flush_interval=0.01, batch_rows=50,
                           max_queue=200, max_cpu_share=0.001)
    try:
        offer(rec, "first", n=50)
        wait_for(lambda: rec.stats()["captured"] == 50, what="the first batch")
        for i in range(2000):
            offer(rec, f"r{i}")
        stats = rec.stats()
        assert stats["dropped"]["queue_full"] > 0 and stats["captured"] + stats["queued"] + stats["dropped"]["queue_full"] == 4050
        assert rec.flush(60)
        stats = rec.stats()
        assert stats["queued"] == 0 and stats["captured"] + stats["dropped"]["queue_full"] == 4050
        assert capture.Store(f"sqlite:///{tmp_path}/c.db").count("credit-risk") == stats["captured"]
    finally:
        assert rec.close(30)


def test_recorder_counts_rows_it_cannot_convert(tmp_path):
    rec = capture.Recorder(f"sqlite:///{tmp_path}/c.db", host="h", flush_interval=0.05)
    try:
        rec.offer("m", 1, None, FEATURES, np.zeros((2, 2)), [0, 1], 1.0)   # no request id
        rec.offer("m", 1, "r", FEATURES, np.zeros((3, 2)), [0, 1], 1.0)    # 3 rows, 2 predictions: counted as 2
        rec.offer("m", 1, "ok", FEATURES, np.zeros((1, 2)), [0], 1.0)
        rec.offer("m", 1, "x", FEATURES, object(), 7, 1.0)                 # nothing sensible at all
        assert rec.flush(60)
        assert rec.stats()["captured"] == 1 and rec.stats()["dropped"]["invalid"] == 5
    finally:
        rec.close(30)


def test_recorder_with_nothing_listening(caplog):
    """A PostgreSQL URL with nothing on the port: offer() returns, rows are counted as dropped."""
    rec = capture.Recorder(f"postgresql://postgres:s3cretpw@127.0.0.1:{free_port()}/x", host="h", flush_interval=0.05,
                           max_queue=50)
    try:
        with caplog.at_level("WARNING", logger="mlpipe.capture"):
            for i in range(200):
                assert offer(rec, f"r{i}") is None
            wait_for(lambda: rec.stats()["dropped"]["db_error"] > 0, what="a db_error drop")
            rec.flush(30)
        stats = rec.stats()
        assert stats["captured"] == 0 and stats["queued"] + total_dropped(rec) == 400
        lines = [r.getMessage() for r in caplog.records if "rows dropped (db_error)" in r.getMessage()]
        assert len(lines) == 1, lines  # rate-limited: one line per 30 s per reason
        assert "Connection refused" in lines[0] or "connection" in lines[0].lower()
        assert "s3cretpw" not in lines[0] and "postgres:***@" in lines[0]
    finally:
        rec.close(5)


def test_locked_postgresql_fills_the_queue_then_recovers(pg_server):
    """A table lock makes the writer wait as long as the lock is held: the request path does not
    wait with it; rows beyond the queue are counted as queue_full, and everything else lands once
    the lock goes."""
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    store = capture.Store(url)
    store.write([row("warm-up")])
    engine = sa.create_engine(store.engine.url)
    conn = engine.connect()
    trans = conn.begin()
    conn.execute(sa.text("LOCK TABLE mlpipe_predictions IN ACCESS EXCLUSIVE MODE"))
    rec = capture.Recorder(url, host="h", flush_interval=0.05, max_queue=100, batch_rows=10, lock_timeout=None,
                           statement_timeout=None)  # waits as long as the lock is held
    try:
        offer(rec, "first")  # the writer takes it and waits on the lock
        wait_for(lambda: _waiting_on_lock(engine), what="the writer to wait on the table lock")
        for i in range(300):
            offer(rec, f"r{i}")
        stats = rec.stats()
        assert stats["captured"] == 0 and stats["dropped"]["queue_full"] == 600 - 100
        assert stats["queued"] == 100 + 2
    finally:
        trans.rollback()
        conn.close()
        engine.dispose()
    try:
        assert rec.flush(60)
        assert rec.stats() == {"captured": 102, "dropped": {"queue_full": 500, "db_error": 0, "invalid": 0, "duplicate": 0}, "queued": 0}
        assert store.count("credit-risk") == 103
    finally:
        rec.close(30)


def _waiting_on_lock(engine) -> bool:
    with engine.connect() as c:
        return bool(c.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND application_name = 'mlpipe-capture'")).scalar_one())


def test_locked_sqlite_file_costs_rows_not_requests(tmp_path):
    url = f"sqlite:///{tmp_path}/capture.db"
    capture.Store(url).write([row("warm-up")])
    holder = sqlite3.connect(tmp_path / "capture.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    rec = capture.Recorder(url, host="h", flush_interval=0.05)
    try:
        for i in range(20):
            offer(rec, f"r{i}")
        wait_for(lambda: rec.stats()["dropped"]["db_error"] > 0, what="the busy timeout to pass")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    sent = [40]

    def offer_and_check():  # while the writer backs off, offers are dropped at once (db_error)
        offer(rec, f"after{sent[0]}")
        sent[0] += 2
        return rec.flush(1) and rec.stats()["captured"] > 0
    try:
        wait_for(offer_and_check, what="recovery after the lock")
        stats = rec.stats()
        assert stats["captured"] + stats["dropped"]["db_error"] == sent[0]
        assert capture.Store(url).count("credit-risk") == 1 + stats["captured"]
    finally:
        rec.close(30)


def test_postgresql_stopped_mid_run_then_back(pg_server, caplog):
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    rec = capture.Recorder(url, host="h", flush_interval=0.05)
    try:
        offer(rec, "before")
        assert rec.flush(60) and rec.stats()["captured"] == 2
        pg_server.stop()
        try:
            for i in range(100):
                assert offer(rec, f"down{i}") is None
            wait_for(lambda: rec.flush(1) and rec.stats()["dropped"]["db_error"] > 0, what="db_error drops")
            assert rec.stats()["captured"] == 2
        finally:
            pg_server.start()
        sent = [0]

        def offer_and_check():  # while the writer backs off, offers are dropped at once (db_error)
            offer(rec, f"after{sent[0]}")
            sent[0] += 1
            return rec.flush(1) and capture.Store(url).count("credit-risk", since=0) > 2
        with caplog.at_level("WARNING", logger="mlpipe.capture"):
            wait_for(offer_and_check, what="capture to resume")
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        stats = rec.stats()
        assert stats["captured"] + stats["dropped"]["db_error"] + stats["dropped"]["queue_full"] == 2 + 200 + 2 * sent[0]
    finally:
        rec.close(30)


def _request_ids(url):
    store = capture.Store(url)
    try:
        engine = store.engine
        with engine.connect() as c:
            return c.execute(sa.text("SELECT DISTINCT request_id FROM mlpipe_predictions")).all()
    finally:
        store.close()


def test_recorder_prunes_by_itself(tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    capture.Store(url).write([row(f"old{i}", ts=time.time() - 86400) for i in range(5)])
    rec = capture.Recorder(url, host="h", flush_interval=0.05, max_age_seconds=3600, max_rows=4, prune_every=0.1)
    try:
        for i in range(6):
            offer(rec, f"new{i}", n=1)
        wait_for(lambda: rec.flush(1) and capture.Store(url).count("credit-risk") == 4, what="the prune")
        assert sorted(r["request_id"] for r in capture.Store(url).records("credit-risk")) == ["new2", "new3", "new4", "new5"]
    finally:
        rec.close(30)


def test_recorder_after_fork(db):
    """A Recorder used in the parent (its writer thread running, its engine connected), then in a
    forked child: the child starts its own writer and connection, and the parent's still work."""
    rec = capture.Recorder(db, host="parent", flush_interval=0.05)
    try:
        offer(rec, "parent-1")
        assert rec.flush(60)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.close(read)
                before = rec.stats()
                offer(rec, "child-1")
                ok = rec.flush(60)
                os.write(write, json.dumps({"before": before, "after": rec.stats(), "ok": ok}).encode())
                rec.close(30)
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as f:
            report = json.loads(f.read() or "{}")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, report
        assert report["before"] == {"captured": 0, "dropped": {"queue_full": 0, "db_error": 0, "invalid": 0, "duplicate": 0}, "queued": 0}
        assert report["ok"] and report["after"]["captured"] == 2
        offer(rec, "parent-2")  # the parent's writer and connections survived the child
        assert rec.flush(60)
        assert rec.stats() == {"captured": 4, "dropped": {"queue_full": 0, "db_error": 0, "invalid": 0, "duplicate": 0}, "queued": 0}
    finally:
        rec.close(30)
    assert sorted({r["request_id"] for r in capture.Store(db).records("credit-risk")}) == ["child-1", "parent-1", "parent-2"]


def test_offer_from_many_threads(tmp_path):
    rec = capture.Recorder(f"sqlite:///{tmp_path}/c.db", host="h", flush_interval=0.05, max_queue=100000)

    def work(t):
        for i in range(100):
            offer(rec, f"t{t}-{i}", n=1)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert rec.flush(60) and rec.stats()["captured"] == 800
    finally:
        rec.close(30)


# -- the commands -------------------------------------------------------------------------------
def invoke(group, args, db):
    return CliRunner().invoke(group, [*args, "--db", db])


@pytest.fixture
def captured(db):
    capture.Store(db).write([row("aa1"), row("bb2", version=2, prediction="malignant"), row("bb2", r=1, version=2)])
    return db


def test_feedback_load_csv(captured, tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("request_id,label,row\naa1,1.0,0\nbb2,benign,1\n\nzz9,0,\n")
    r = invoke(feedback, ["load", "credit-risk", str(f)], captured)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "stored 3 labels for credit-risk: 2 matched a captured prediction, 1 did not"
    labels = {(x["request_id"], x["row"]): x["label"] for x in capture.Store(captured).records("credit-risk", labelled=True)}
    assert labels == {("aa1", 0): 1, ("bb2", 1): "benign"}  # "1.0" -> 1: numbers stay numbers


def test_feedback_load_jsonl(captured, tmp_path):
    f = tmp_path / "labels.jsonl"
    f.write_text('{"request_id": "aa1", "label": 0}\n{"request_id": "bb2", "label": "1", "row": 0}\n')
    r = invoke(feedback, ["load", "credit-risk", str(f), "--json"], captured)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"model": "credit-risk", "stored": 2, "matched": 2, "unmatched": 0}
    labels = {x["request_id"]: x["label"] for x in capture.Store(captured).records("credit-risk", labelled=True)}
    assert labels == {"aa1": 0, "bb2": "1"}  # a JSON string stays a string
    g = tmp_path / "labels.txt"  # no telling extension: the content says JSON lines
    g.write_text('{"request_id": "aa1", "label": 1}\n')
    assert invoke(feedback, ["load", "credit-risk", str(g)], captured).exit_code == 0
    assert capture.Store(captured).records("credit-risk", labelled=True)[0]["label"] == 1


@pytest.mark.parametrize("name, text, message", [
    ("l.csv", "request_id,label\naa1,1\nbb2\n", "l.csv:3: 1 fields, the header has 2"),
    ("l.csv", "request_id,lable\naa1,1\n", "l.csv:1: unknown column 'lable'"),
    ("l.csv", "request_id,label\naa1,1\nbad id,0\n", "l.csv:3: request_id 'bad id' is not a request id"),
    ("l.csv", "request_id,label,row\naa1,1,-1\n", "l.csv:2: row '-1' is not a row number"),
    ("l.csv", "request_id,label\naa1,\n", "l.csv:2: the label is empty"),
    ("l.csv", "", "is empty"),
    ("l.jsonl", '{"request_id": "aa1", "label": 1}\n{"request_id": "bb2", "label": 1\n', "l.jsonl:2: not JSON"),
    ("l.jsonl", '{"request_id": "aa1"}\n', "l.jsonl:1: no label"),
    ("l.jsonl", '{"request_id": "aa1", "label": [1]}\n', "l.jsonl:1: label \\[1\\] is not a class or a number"),
    ("l.jsonl", '[{"request_id": "aa1", "label": 1}]\n', "l.jsonl:1: a JSON list, not an object"),
    ("l.jsonl", '{"request_id": "aa1", "label": 1, "when": 3}\n', "l.jsonl:1: unknown key 'when'"),
])
def test_feedback_load_bad_line_stores_nothing(captured, tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    r = invoke(feedback, ["load", "credit-risk", str(f)], captured)
    assert isinstance(r.exception, UsageError) and r.exception.exit_code == 3, r.output
    assert f"{tmp_path}/" in str(r.exception) or "is empty" in message
    assert re.search(message, str(r.exception)), str(r.exception)
    assert labels_in(captured) == 0


def test_feedback_load_on_a_dead_database(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("request_id,label\naa1,1\n")
    r = invoke(feedback, ["load", "credit-risk", str(f)], f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert isinstance(r.exception, NotReady) and r.exception.exit_code == 2
    assert "storing labels failed" in str(r.exception)


def test_predictions_list(captured):
    capture.Store(captured).attach_labels("credit-risk", [("bb2", 1, "benign")], source="t")
    r = invoke(predictions, ["list", "credit-risk", "--since", "30m"], captured)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "REQUEST", "ID", "VERSION", "HOST", "LATENCY", "PREDICTION", "LABEL"]
    assert len(lines) == 4 and "bb2#1" in r.output and "v2" in lines[1] and "1.2 ms" in lines[1]
    assert any(line.split()[-2:] == ["1", "benign"] for line in lines) and '"malignant"' not in r.output
    r = invoke(predictions, ["list", "credit-risk", "--labelled", "--json"], captured)
    out = json.loads(r.output)
    assert [(x["request_id"], x["row"], x["label"]) for x in out] == [("bb2", 1, "benign")]
    assert out[0]["inputs"] == {"mean radius": 14.5, "mean texture": 20} and out[0]["time"].endswith("+00:00")
    r = invoke(predictions, ["list", "nobody"], captured)
    assert r.exit_code == 0 and r.output.startswith("no captured predictions of nobody in the last 1h")
    r = invoke(predictions, ["list", "credit-risk", "--since", "yesterday"], captured)
    assert isinstance(r.exception, UsageError) and "--since 'yesterday' is not a duration" in str(r.exception)


def test_predictions_prune_command(captured):
    capture.Store(captured).write([row("ancient", ts=time.time() - 90 * 86400)])
    r = invoke(predictions, ["prune", "--json"], captured)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"deleted": 1, "max_age_seconds": 30 * 86400, "max_rows": 1_000_000, "model": None}
    r = invoke(predictions, ["prune", "--max-rows", "1"], captured)
    assert r.output.startswith("deleted 2 captured predictions older than 30d or beyond 1 per model")


def test_every_command_has_help_with_an_example():
    for group in (predictions, feedback):
        assert "Example:" in group.help
        for name, cmd in group.commands.items():
            assert "Example:" in (cmd.help or ""), name


def test_hanging_server_does_not_block_offer():
    """A server that accepts the connection and never answers: the writer waits for its connect
    timeout, offer() does not."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        port = srv.getsockname()[1]
        rec = capture.Recorder(f"postgresql://postgres@127.0.0.1:{port}/x", host="h", flush_interval=0.05, max_queue=10)
        try:
            offer(rec, "first")
            peer, _ = srv.accept()  # the writer is connecting; nobody will answer it
            with peer:
                for i in range(100):
                    offer(rec, f"r{i}")
                stats = rec.stats()
                assert stats["captured"] == 0 and sum(stats["dropped"].values()) + stats["queued"] == 202
                wait_for(lambda: rec.stats()["dropped"]["db_error"] >= 2, what="the connect timeout")
        finally:
            rec.close(5)


def test_worker_processes_write_one_sqlite_file(tmp_path):
    """Three forked "workers" with a Recorder each write the same SQLite file at once (WAL mode and
    the busy timeout): every row lands."""
    url = f"sqlite:///{tmp_path}/shared/capture.db"
    pids = []
    for w in range(3):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                rec = capture.Recorder(url, host=f"worker-{w}", flush_interval=0.01, batch_rows=20)
                for i in range(300):
                    offer(rec, f"w{w}-{i}", n=1)
                    if i % 50 == 0:
                        time.sleep(0.01)
                ok = rec.flush(120) and rec.stats()["captured"] == 300
                rec.close(30)
                code = 0 if ok else 2
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0, 0]
    recs = capture.Store(url).records("credit-risk")
    assert len(recs) == 900 and {r["host"] for r in recs} == {"worker-0", "worker-1", "worker-2"}
    with sqlite3.connect(tmp_path / "shared" / "capture.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_predictions_source_refuses_labels_that_mix_numbers_and_text(tmp_path, monkeypatch):
    """One client's "yes" among 0/1 labels would fail deep inside scikit-learn (and stall every
    retrain that learns from the fed-back labels): the source refuses it, naming the request ids."""
    from mlpipe import capture, data
    from mlpipe.errors import DataError
    url = f"sqlite:///{tmp_path}/mix.db"
    monkeypatch.setenv("MLPIPE_CAPTURE_DB", url)
    store = capture.Store(url)
    store.write([{"request_id": f"r{i}", "row": 0, "model": "toy", "version": 1, "host": "h", "ts": 1e9 + i,
                  "latency_ms": 1.0, "inputs": {"a": float(i)}, "prediction": i % 2} for i in range(6)])
    store.attach_labels("toy", [(f"r{i}", 0, i % 2) for i in range(5)] + [("r5", 0, "yes")], "test")
    with pytest.raises(DataError, match=r"mix numbers and text \(1 text label\(s\), e\.g\. request ids r5\)"):
        data.load("predictions:toy?labelled=true&target=y")
    store.attach_labels("toy", [("r5", 0, 1.0)], "test")  # corrected: a later label replaces the earlier one
    frame = data.load("predictions:toy?labelled=true&target=y").frame
    assert frame["y"].dtype == "int64" and frame["y"].tolist() == [0, 1, 0, 1, 0, 1]


# -- issue 11 review: retention per model, keys with the model, timeouts, a deleted file, bytes ---
def test_prune_is_per_model_and_labels_go_with_their_predictions(db):
    store = capture.Store(db)
    now = time.time()
    store.write([row(f"a{i}", model="a", ts=now - 100 + i) for i in range(10)]
                + [row(f"b{i}", model="b", ts=now - 100 + i) for i in range(10)])
    store.attach_labels("b", [(f"b{i}", 0, i) for i in range(10)], source="one load")  # one timestamp
    assert store.prune(None, 3, model="a") == 7
    assert store.count("a") == 3 and store.count("b") == 10
    assert store.prune(None, 4) == 6  # every model
    kept = store.predictions("b")
    assert sorted(kept["request_id"]) == [f"b{i}" for i in range(6, 10)]
    assert sorted(kept["label"]) == [6, 7, 8, 9] and labels_in(db) == 4  # the kept rows keep their labels
    assert store.prune(None, 0) == 0  # 0: no row limit
    assert store.prune(3600, None, model="a") == 0 and store.count("a") == 3


def test_recorder_prunes_only_its_own_models(tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    capture.Store(url).write([row(f"other{i}", model="other") for i in range(10)])
    rec = capture.Recorder(url, host="h", flush_interval=0.05, max_age_seconds=3600, max_rows=2, prune_every=0.1)
    try:
        for i in range(5):
            offer(rec, f"new{i}", n=1)
        wait_for(lambda: rec.flush(1) and capture.Store(url).count("credit-risk") == 2, what="the prune")
        assert capture.Store(url).count("other") == 10
    finally:
        rec.close(30)


def test_predictions_prune_command_per_model_and_max_rows_0(captured):
    capture.Store(captured).write([row("m1", model="m"), row("m2", model="m")])
    r = invoke(predictions, ["prune", "--max-rows", "0"], captured)
    assert r.exit_code == 0 and "no row limit" in r.output
    assert capture.Store(captured).count("credit-risk") == 3 and capture.Store(captured).count("m") == 2
    r = invoke(predictions, ["prune", "--max-rows", "1", "--model", "m", "--json"], captured)
    assert json.loads(r.output)["deleted"] == 1 and json.loads(r.output)["model"] == "m"
    assert capture.Store(captured).count("credit-risk") == 3 and capture.Store(captured).count("m") == 1
    r = invoke(predictions, ["prune", "--help"], captured)
    assert "0: no row limit" in r.output and "--model" in r.output


def test_one_request_id_for_two_models(db):
    store = capture.Store(db)
    assert store.write([row("gw-1", model="a", prediction=1), row("gw-1", model="b", prediction=2)]) == 2
    assert store.write([row("gw-1", model="a", prediction=9)]) == 0  # already captured: kept as it was
    assert store.attach_labels("a", [("gw-1", 0, 1)], source="t")["matched"] == 1
    assert store.attach_labels("b", [("gw-1", 0, 0)], source="t")["matched"] == 1
    assert [(r["prediction"], r["label"]) for r in store.records("a")] == [(1, 1)]
    assert [(r["prediction"], r["label"]) for r in store.records("b")] == [(2, 0)]
    rec = capture.Recorder(db, host="h", flush_interval=0.05)
    try:
        offer(rec, "twice", model="a")
        offer(rec, "twice", model="b")
        assert rec.flush(60)
        offer(rec, "twice", model="a")  # a client reusing its id: not captured again
        assert rec.flush(60)
        assert rec.stats()["captured"] == 4 and rec.stats()["dropped"]["duplicate"] == 2
    finally:
        rec.close(30)


@pytest.mark.parametrize("table", ["mlpipe_predictions", "mlpipe_feedback"])
def test_tables_of_a_pre_release_mlpipe_are_refused(db, table):
    old = sa.MetaData()
    for t in (capture.predictions_table, capture.feedback_table):
        t.to_metadata(old)
    if table == "mlpipe_predictions":
        t = old.tables[table]
        t.constraints = {c for c in t.constraints if not isinstance(c, sa.UniqueConstraint)}
        t.append_constraint(sa.UniqueConstraint("request_id", "row", name="uq_mlpipe_predictions_request_row"))
    else:
        old.remove(old.tables[table])
        sa.Table(table, old, sa.Column("request_id", sa.String(64), primary_key=True),
                 sa.Column("row", sa.Integer, primary_key=True), sa.Column("model", sa.String(64), nullable=False),
                 sa.Column("label", sa.Text, nullable=False), sa.Column("ts", sa.Double, nullable=False),
                 sa.Column("source", sa.String(255), nullable=False))
    store = capture.Store(db)
    if store.sqlite_path is not None:
        store.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    old.create_all(store.engine)
    store.close()
    with pytest.raises(UsageError, match=f"table {table} is keyed on .* pre-release mlpipe") as info:
        capture.Store(db).count("credit-risk")
    assert "drop or rename the table" in info.value.hint


def test_locked_postgresql_times_out(pg_server):
    """LOCK TABLE ... ACCESS EXCLUSIVE (what VACUUM FULL takes): readers, labels and the Recorder's
    writes fail after their lock timeout instead of waiting for ever."""
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    capture.Store(url).write([row("warm-up")])
    engine = sa.create_engine(capture.Store(url).engine.url)
    conn = engine.connect()
    trans = conn.begin()
    conn.execute(sa.text("LOCK TABLE mlpipe_predictions IN ACCESS EXCLUSIVE MODE"))
    store = capture.Store(url, lock_timeout=0.5)
    rec = capture.Recorder(url, host="h", flush_interval=0.05, lock_timeout=0.5)
    try:
        with pytest.raises(NotReady, match="lock timeout") as info:
            store.predictions("credit-risk")
        assert "docs/runbooks/capture-database.md" in info.value.hint
        with pytest.raises(NotReady, match="lock timeout"):
            store.attach_labels("credit-risk", [("warm-up", 0, 1)], source="t")
        offer(rec, "locked")
        wait_for(lambda: rec.stats()["dropped"]["db_error"] == 2, what="the writer's lock timeout")
    finally:
        trans.rollback()
        conn.close()
        engine.dispose()
        rec.close(5)
    assert len(store.predictions("credit-risk")) == 1


def test_deleted_sqlite_file_is_created_again(tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/capture.db"
    rec = capture.Recorder(url, host="h", flush_interval=0.05)
    try:
        offer(rec, "before")
        assert rec.flush(60) and capture.Store(url).count("credit-risk") == 2
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp_path}/capture.db{suffix}")
        with caplog.at_level("WARNING", logger="mlpipe.capture"):
            offer(rec, "after")
            assert rec.flush(60)
        assert [r["request_id"] for r in capture.Store(url).records("credit-risk")] == ["after", "after"]
        assert sum("deleted or replaced" in r.getMessage() for r in caplog.records) == 1
    finally:
        rec.close(30)


def test_queue_is_bounded_by_bytes(tmp_path):
    """Large requests (400 KB strings) while the writer is stuck on a locked file: the queue holds
    what fits in max_queue_bytes, the rest is dropped (queue_full)."""
    url = f"sqlite:///{tmp_path}/capture.db"
    capture.Store(url).write([row("warm-up")])
    holder = sqlite3.connect(tmp_path / "capture.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    rec = capture.Recorder(url, host="h", flush_interval=0.05, max_queue_bytes=1_000_000)
    big = np.array([["x" * 400_000, "y"]], dtype=object)
    try:
        rec.offer("credit-risk", 1, "first", FEATURES, big, [1], 1.0)
        wait_for(lambda: rec.stats()["queued"] == 1 and not rec._items, what="the writer to take the first")
        for i in range(10):
            rec.offer("credit-risk", 1, f"r{i}", FEATURES, big, [1], 1.0)
        stats = rec.stats()
        assert stats["dropped"]["db_error"] == 0 and stats["queued"] == 1 + 2 and stats["dropped"]["queue_full"] == 8
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        rec.close(30)
