"""Prediction capture: what the serving hosts predicted, kept in a database, with the true labels
fed back for it later.

The database is a SQLAlchemy URL: ``MLPIPE_CAPTURE_DB``, else ``sqlite:///<root>/capture.db`` where
root is ``MLPIPE_FLEET_ROOT`` or ``~/.mlpipe``. SQLite (embedded; WAL mode and a busy timeout, so
the gunicorn workers of one host, and several hosts of one machine, write the same file) or
PostgreSQL (``postgresql://user:password@host/db``, ``pip install 'mlpipe[postgres]'``) for teams.

    mlpipe_predictions  one row per predicted input row: request_id, row, model, version, host,
                        ts (unix seconds, UTC), latency_ms, inputs (JSON object), prediction (JSON)
    mlpipe_feedback     the true label of (request_id, row) for a model; a later label replaces
                        an earlier one

A request id identifies a prediction together with the model (both tables are keyed on request_id,
row, model): an API gateway sends one X-Request-Id to every backend.

The request path never waits on the database: the server calls ``Recorder.offer()``, which only
appends to a bounded in-memory queue; a writer thread per process batches the rows into the
database. A slow, full or dead database costs captured rows (counted by reason in ``stats()``,
logged at most once per 30 s per reason), never a failed or slower prediction. The writer shares
the serving process's interpreter lock, so it is paced to a share of a core (``max_cpu_share``,
2%): traffic that offers more rows than that writes loses the excess (``queue_full``), not speed.

Retention is bounded: the writer deletes rows older than ``max_age_seconds`` (30 days by default)
and all but the newest ``max_rows`` (1,000,000) of each model it has captured rows for, every
``prune_every`` seconds (the database may be shared by models with other settings); a label goes with
its prediction, or by age when it has none. ``mlpipe predictions prune`` does the same by hand.

PostgreSQL statements have a server-side statement and lock timeout (60 s / 10 s for readers and
the CLIs, 5 s for the Recorder's writes): a table lock held by VACUUM FULL makes them fail with
NotReady instead of hanging the monitor or a serving worker.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from orjson import OPT_SERIALIZE_NUMPY as _ORJSON_NUMPY
from orjson import dumps as _orjson_dumps
from sqlalchemy import exc as sa_exc

from mlpipe.errors import NotReady, UsageError

ENV = "MLPIPE_CAPTURE_DB"
CONNECT_TIMEOUT = 3         # seconds to reach a PostgreSQL server before giving up
SQLITE_BUSY_TIMEOUT = 5     # seconds to wait for another process's write lock on a SQLite file
READ_CHUNK = 20_000       # rows per chunk when reading captured predictions into a DataFrame
LOG_EVERY = 30.0            # at most one log line per reason in this many seconds
MAX_BACKOFF = 30.0          # seconds between reconnect attempts at most
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
META = ("request_id", "row", "model", "version", "host", "ts", "latency_ms")
DROP_REASONS = ("queue_full", "db_error", "invalid", "duplicate")
STATEMENT_TIMEOUT = 60.0    # seconds a PostgreSQL statement of a reader or a CLI may run (server side)
LOCK_TIMEOUT = 10.0         # seconds it may wait for a table lock (VACUUM FULL, LOCK TABLE, a migration)
WRITE_TIMEOUT = 5.0         # both, for the serving workers' Recorder: a stuck write costs rows, not a worker
MAX_QUEUE_BYTES = 64 << 20  # what the queued requests may hold per serving process (estimated)
RUNBOOK = "docs/runbooks/capture-database.md"
INSERT_COLUMNS = ("request_id", "row", "model", "version", "host", "ts", "latency_ms", "inputs", "prediction")
_INSERT_SQL = ("INSERT INTO mlpipe_predictions (" + ", ".join(f'"{c}"' for c in INSERT_COLUMNS) + ") VALUES (%s) "
               'ON CONFLICT ("request_id", "row", "model") DO NOTHING')
KEY = ("request_id", "row", "model")  # a request id is unique per model: a gateway sends one id to every backend

log = logging.getLogger("mlpipe.capture")

metadata = sa.MetaData()
predictions_table = sa.Table(
    "mlpipe_predictions", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("row", sa.Integer, nullable=False),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("latency_ms", sa.Double),
    sa.Column("inputs", sa.Text, nullable=False),
    sa.Column("prediction", sa.Text),
    sa.UniqueConstraint("request_id", "row", "model", name="uq_mlpipe_predictions_request_row_model"),
    sa.Index("ix_mlpipe_predictions_model_ts", "model", "ts"),
)
feedback_table = sa.Table(
    "mlpipe_feedback", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("row", sa.Integer, primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("source", sa.String(255), nullable=False),
    sa.Index("ix_mlpipe_feedback_model_ts", "model", "ts"),
)


def db_url(explicit: str | None = None) -> str:
    """The capture database URL: ``explicit``, else MLPIPE_CAPTURE_DB, else the SQLite file
    ``capture/capture.db`` under MLPIPE_FLEET_ROOT (or ~/.mlpipe): where the model_server role puts it
    on the local fleet (a folder of its own, the only one under the root the server user may write)."""
    url = (explicit or os.environ.get(ENV) or "").strip()
    if url:
        return url
    root = os.environ.get("MLPIPE_FLEET_ROOT") or os.path.join(os.path.expanduser("~"), ".mlpipe")
    return f"sqlite:///{os.path.abspath(os.path.join(root, 'capture', 'capture.db'))}"


def redact(url: str) -> str:
    """The URL with its password masked: what messages and logs show."""
    try:
        u = sa.engine.make_url(url)
        return u.render_as_string(hide_password=True) if u.password is not None else url
    except Exception:
        return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", str(url))


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def dumps(value) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


def _loads_many(texts: list) -> list:
    """Many JSON texts (None kept as None) parsed in one json.loads call: what makes reading a
    million captured rows take seconds, not minutes."""
    present = [t for t in texts if t is not None]
    parsed = iter(json.loads("[" + ",".join(present) + "]")) if present else iter(())
    return [None if t is None else next(parsed) for t in texts]


def _loads_column(texts) -> list:
    """A column of JSON texts (None kept as None) parsed: each distinct text once when they repeat
    (class labels), else all in one json.loads call."""
    distinct = set(texts)
    if len(distinct) <= max(16, len(texts) // 8):
        parsed = {t: None if t is None else json.loads(t) for t in distinct}
        if not any(isinstance(v, (list, dict)) for v in parsed.values()):  # never share a mutable value
            return list(map(parsed.__getitem__, texts))
    return _loads_many(list(texts))


_ARROW_KINDS = ("is_floating", "is_integer", "is_boolean", "is_string", "is_large_string", "is_null")


def _parse_inputs(texts) -> tuple[int, dict]:
    """A chunk's inputs (JSON objects) as columns: (rows, {name: numpy array}), names in order of
    first appearance, a name missing from a row NaN. pyarrow parses the lot as JSON lines into typed
    columns (and lets go of the GIL while it does); anything it does not take the same way
    (NaN/Infinity, dates, nested values, a value that is not an object) goes through json.loads."""
    n = len(texts)
    try:
        import pyarrow as pa
        import pyarrow.json as pa_json
        buf = "\n".join(texts).encode()
        table = pa_json.read_json(pa.py_buffer(buf), read_options=pa_json.ReadOptions(block_size=max(1 << 20, len(buf) // 4 + 1)))
        del buf
        if table.num_rows == n and all(any(getattr(pa.types, k)(f.type) for k in _ARROW_KINDS) for f in table.schema):
            return n, {f.name: table.column(i).to_numpy(zero_copy_only=False) for i, f in enumerate(table.schema)}
    except Exception:
        pass
    import pandas as pd
    frame = pd.DataFrame.from_records(json.loads("[" + ",".join(texts) + "]"))
    return n, {str(c): frame[c].to_numpy() for c in frame.columns}


def _join_columns(chunks: list) -> dict:
    """Per-chunk columns -> one array per name; a chunk without a name gives NaN for its rows."""
    names: dict = {}
    for _, cols in chunks:
        names.update(dict.fromkeys(cols))
    out = {}
    for name in names:
        parts = [cols.get(name) if name in cols else np.full(n, np.nan) for n, cols in chunks]
        out[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        for _, cols in chunks:  # let go of each chunk's copy as soon as it is joined
            cols.pop(name, None)
    return out


def _json_texts(values, none: str | None = None) -> list:
    """Each value as its JSON text, as ``dumps`` would write it (None becomes ``none``), without a
    json.dumps call per value for the common types: finite floats and ints are their repr, strings
    (class labels, categories: few distinct) are encoded once each."""
    out = []
    append = out.append
    seen: dict = {}
    for v in values:
        t = type(v)
        if t is float:
            append(repr(v) if v - v == 0 else dumps(v))  # v - v is nan for nan and +-inf
        elif t is int:
            append(repr(v))
        elif v is None:
            append(none)
        elif t is str:
            text = seen.get(v)
            if text is None:
                text = seen[v] = dumps(v)
            append(text)
        else:
            append(dumps(v))
    return out


_TEMPLATES: dict = {}


def _template(names: tuple, conv: str) -> tuple[str, bool]:
    """``{"a":%r,"b":%r}`` for the feature names (``%s`` with ``conv`` "s"): one row's JSON object is
    one %-format. The flag says whether the names contain "nan" or "inf", which would defeat the
    cheap search for non-finite floats in the formatted text."""
    key = (names, conv)
    got = _TEMPLATES.get(key)
    if got is None:
        body = ",".join(json.dumps(str(n)).replace("%", "%%") + ":%" + conv for n in names)
        got = ("{" + body + "}", any("nan" in str(n) or "inf" in str(n) for n in names))
        if len(_TEMPLATES) > 256:
            _TEMPLATES.clear()
        _TEMPLATES[key] = got
    return got


def _inputs_json(features, X) -> list[str]:
    """One JSON object per row of ``X`` (a float/int matrix in ``features`` order, a DataFrame, or
    rows of values), worked out a whole request at a time: what ``dumps(dict(zip(names, row)))`` gives
    per row, at a fraction of its cost."""
    if hasattr(X, "columns") and hasattr(X, "to_dict"):  # a DataFrame: column by column
        names = tuple(str(c) for c in X.columns)
        if len(set(names)) == len(names):
            tmpl, _ = _template(names, "s")
            columns = []
            for j in range(len(names)):
                col = X.iloc[:, j]
                values = col.tolist()
                if not isinstance(col.dtype, np.dtype) and col.hasnans:  # pandas NA: null, as to_dict has it
                    import pandas as pd
                    values = [None if v is pd.NA else v for v in values]
                columns.append(_json_texts(values, "null"))
            return [tmpl % row for row in zip(*columns)]
        return [dumps(r) for r in X.to_dict("records")]
    names = tuple(features)
    kind = getattr(getattr(X, "dtype", None), "kind", None)
    if (kind in ("f", "i", "u") and getattr(X, "ndim", 0) == 2 and X.shape[1] == len(names)
            and len(set(names)) == len(names)):
        rows = X.tolist()
        # orjson writes a float's shortest round-trip text (as repr does) several times faster than
        # %r formatting; it writes NaN and +-inf as null, so rows holding one take the slow way (NaN)
        texts = [_orjson_dumps(dict(zip(names, r))).decode() for r in rows]
        if kind == "f" and not math.isfinite(float(X.sum())):
            for i in np.flatnonzero(~np.isfinite(X).all(axis=1)).tolist():
                texts[i] = dumps(dict(zip(names, rows[i])))
        return texts
    return [dumps(dict(zip(names, r))) for r in (X.tolist() if hasattr(X, "tolist") else X)]


def _numeric_inputs_json(batch: list) -> dict:
    """{item index: its rows' JSON objects} for the queue items whose inputs are numeric matrices,
    worked out for all the items of one feature list at once: one vstack and one orjson call for the
    batch, then one %-format per row (a one-row request would otherwise pay the per-call costs for
    its single row). Rows holding NaN or an infinity are left to ``_inputs_json`` (orjson writes
    them as null), and so is anything else."""
    groups: dict = {}
    for k, item in enumerate(batch):
        features, X = item[4], item[5]
        if (type(X) is np.ndarray and X.ndim == 2 and X.dtype.kind in "fiu" and X.shape[0] > 0
                and X.shape[1] == len(features)):
            groups.setdefault((tuple(features), X.dtype.str), []).append(k)  # one dtype: no upcast
    out: dict = {}
    for (names, dtype), ks in groups.items():
        if not names or len(set(names)) != len(names) or any(not isinstance(n, str) for n in names):
            continue
        floats = np.dtype(dtype).kind == "f"
        try:
            M = np.vstack([batch[k][5] for k in ks]) if len(ks) > 1 else batch[ks[0]][5]
            text = _orjson_dumps(M, option=_ORJSON_NUMPY).decode()
        except Exception:  # a dtype orjson does not take, a ragged group: the item by item way
            continue
        rows = text[2:-2].split("],[")
        tmpl, _ = _template(names, "s")
        finite = np.isfinite(M).all(axis=1).tolist() if floats else None
        start = 0
        for k in ks:
            n = batch[k][5].shape[0]
            if finite is None or all(finite[start:start + n]):
                out[k] = [tmpl % tuple(r.split(",")) for r in rows[start:start + n]]
            start += n
    return out


_FORKS = [0]  # how many forks this process is down from where it started: a recorder made before one resets
os.register_at_fork(after_in_child=lambda: _FORKS.__setitem__(0, _FORKS[0] + 1))


def _size(value) -> int:
    """A cheap estimate of the memory a queued request's inputs or predictions hold: nbytes for
    numpy (strings in an object array from a sample), pandas' memory_usage, a sample of a list."""
    try:
        import sys
        if hasattr(value, "memory_usage") and hasattr(value, "columns"):  # a DataFrame
            return int(value.memory_usage(index=False, deep=True).sum())
        if isinstance(value, np.ndarray):
            if value.dtype != object or value.size == 0:
                return int(value.nbytes)
            flat = value.ravel()
            step = max(1, flat.size // 64)
            sample = flat[::step]
            return int(value.nbytes + sum(sys.getsizeof(v) for v in sample) * flat.size / len(sample))
        if isinstance(value, (list, tuple)) and value:
            step = max(1, len(value) // 64)
            sample = value[::step]
            per = sum(_size(v) if isinstance(v, (list, tuple, np.ndarray)) else sys.getsizeof(v) for v in sample)
            return int(per * len(value) / len(sample)) + sys.getsizeof(value)
        return sys.getsizeof(value)
    except Exception:
        return 0


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pg_driver() -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3); mlpipe[postgres] installs psycopg2."""
    for module, driver in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        try:
            __import__(module)
            return driver
        except ImportError:
            continue
    raise UsageError("the capture database is PostgreSQL but no PostgreSQL driver is installed",
                     hint="pip install 'mlpipe[postgres]' (psycopg2-binary)")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # persistent in the file: the first connection that gets it wins
        except Exception:
            pass
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


class Store:
    """The capture tables of one database. Methods raise NotReady (exit 2, HTTP 503) when the
    database cannot be reached or written, UsageError for a URL that cannot work."""

    def __init__(self, url: str | None = None, statement_timeout: float | None = STATEMENT_TIMEOUT,
                 lock_timeout: float | None = LOCK_TIMEOUT):
        """``statement_timeout``/``lock_timeout``: seconds (None: the server's default, no limit) a
        PostgreSQL statement may run / wait for a table lock before it fails (NotReady)."""
        self.url = db_url(url)
        self.statement_timeout, self.lock_timeout = statement_timeout, lock_timeout
        self._opened: tuple | None = None  # (st_dev, st_ino) of the SQLite file the connections opened
        self.shown = redact(self.url)
        try:
            u = sa.engine.make_url(self.url)
        except Exception:
            raise UsageError(f"capture database URL {self.shown!r} is not a SQLAlchemy URL",
                             hint="write sqlite:////var/lib/mlpipe/capture.db or postgresql://user:password@host/db") from None
        self._password = u.password
        self.backend = u.get_backend_name()
        self.sqlite_path: Path | None = None
        try:
            if self.backend == "sqlite":
                if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
                    self.sqlite_path = Path(u.database)
                self.engine = sa.create_engine(u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT}, pool_pre_ping=True)
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
                if self.sqlite_path is not None:
                    sa.event.listen(self.engine, "connect", self._note_file)
            elif self.backend == "postgresql":
                if u.drivername == "postgresql":
                    u = u.set(drivername=_pg_driver())
                options = " ".join(f"-c {name}={int(float(value) * 1000)}" for name, value in
                                   (("statement_timeout", statement_timeout), ("lock_timeout", lock_timeout))
                                   if value is not None and float(value) > 0)
                extra = {"options": options} if options else {}
                self.engine = sa.create_engine(
                    u, pool_pre_ping=True, pool_size=2, max_overflow=4, pool_timeout=CONNECT_TIMEOUT,
                    connect_args={"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 30,
                                  "keepalives_interval": 10, "keepalives_count": 3,
                                  "application_name": "mlpipe-capture", **extra})
            else:
                raise UsageError(f"capture database {self.shown} is {self.backend}: only SQLite and PostgreSQL are supported",
                                 hint="set MLPIPE_CAPTURE_DB to sqlite:///PATH or postgresql://user:password@host/db")
        except ImportError as exc:
            raise UsageError(f"the driver for capture database {self.shown} is not installed ({exc.name})",
                             hint="pip install 'mlpipe[postgres]' for PostgreSQL") from None
        self._schema = False

    def __repr__(self) -> str:
        return f"Store({self.shown!r})"

    def close(self) -> None:
        self.engine.dispose()

    def _note_file(self, _dbapi_conn, _record) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.sqlite_path)
            self._opened = (st.st_dev, st.st_ino)

    def file_replaced(self) -> bool:
        """True when the SQLite file the connections opened was deleted or replaced (a pooled
        connection would go on writing to the unlinked inode): then the connections are let go
        of, and the next write creates the file and its tables again. One os.stat."""
        if self.sqlite_path is None or self._opened is None:
            return False
        try:
            st = os.stat(self.sqlite_path)
            same = (st.st_dev, st.st_ino) == self._opened
        except OSError:
            same = False
        if same:
            return False
        self._opened = None
        self.engine.dispose()
        self._schema = False
        return True

    @contextlib.contextmanager
    def _errors(self, doing: str):
        try:
            yield
        except (sa_exc.SQLAlchemyError, OSError) as exc:  # OSError: the SQLite file's folder cannot be made
            msg = _first_line(exc)
            if self._password:
                msg = msg.replace(self._password, "***")
            code = getattr(getattr(exc, "orig", None), "pgcode", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
            if code in ("55P03", "57014"):  # lock_not_available, query_canceled (statement_timeout)
                limits = ", ".join(f"{n} {v:g} s" for n, v in (("lock timeout", self.lock_timeout),
                                                                ("statement timeout", self.statement_timeout)) if v)
                raise NotReady(f"capture database {self.shown}: {doing} failed: {msg} ({limits}): a lock on the "
                               "capture tables (VACUUM FULL, LOCK TABLE, a migration) or a slow database",
                               hint=f"see {RUNBOOK} ('Free space': VACUUM FULL locks the table); "
                                    "pg_stat_activity shows who holds the lock") from None
            raise NotReady(f"capture database {self.shown}: {doing} failed: {msg}",
                           hint="check MLPIPE_CAPTURE_DB, that the database is up and its disk has space; "
                                f"see {RUNBOOK}") from None

    def _check_keys(self) -> None:
        """Tables made by a pre-release mlpipe were keyed on (request_id, row) without the model:
        the second model's rows of a shared request id would be lost. Refuse them, naming the fix."""
        insp = sa.inspect(self.engine)
        want = set(KEY)
        checks = (("mlpipe_predictions", [set(c["column_names"]) for c in insp.get_unique_constraints("mlpipe_predictions")]
                   + [set(i["column_names"]) for i in insp.get_indexes("mlpipe_predictions") if i.get("unique")]),
                  ("mlpipe_feedback", [set(insp.get_pk_constraint("mlpipe_feedback").get("constrained_columns") or ())]))
        for table, keys in checks:
            if want not in keys:
                raise UsageError(
                    f"capture database {self.shown}: table {table} is keyed on (request_id, row) without the model: "
                    "it was created by a pre-release mlpipe, and would lose the rows of a request id sent to two models",
                    hint=f"drop or rename the table (e.g. ALTER TABLE {table} RENAME TO {table}_old); the next "
                         "mlpipe run creates it again")

    def _ensure(self, create: bool = True) -> bool:
        """Create the tables when missing. False when nothing was ever captured (a SQLite file that
        does not exist is not created just to be read)."""
        if self._schema:
            return True
        if self.sqlite_path is not None and not self.sqlite_path.exists():
            if not create:
                return False
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                break
            except (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.OperationalError) as exc:
                # another worker created the same table at the same moment: look again
                text = str(exc).lower()
                if attempt == 2 or ("already exists" not in text and "duplicate" not in text):
                    raise
                time.sleep(0.2)
        self._check_keys()
        self._schema = True
        return True

    def _insert(self, table):
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    # -- predictions ----------------------------------------------------------------------------
    def write(self, rows: list[dict]) -> int:
        """Insert captured rows (keys as the columns; ``inputs`` a dict, ``prediction`` a scalar).
        A (request_id, row, model) already stored is kept as it was. Returns the rows inserted."""
        values = []
        for r in rows:
            inputs, pred = r.get("inputs", {}), r.get("prediction")
            values.append((str(r["request_id"])[:64], int(r.get("row", 0)), str(r["model"])[:64], int(r["version"]),
                           str(r.get("host") or "")[:255], float(r["ts"]),
                           None if r.get("latency_ms") is None else float(r["latency_ms"]),
                           inputs if isinstance(inputs, str) else dumps(inputs), None if pred is None else dumps(pred)))
        return self.write_tuples(values)

    def write_tuples(self, values: list[tuple]) -> int:
        """Insert rows given as tuples in ``INSERT_COLUMNS`` order, already converted (inputs and
        prediction JSON texts): one prepared statement through the driver (sqlite3 executemany,
        psycopg2 execute_values), no SQLAlchemy work per row. What the Recorder's writer calls.
        Returns the rows inserted: a (request_id, row, model) already stored is kept as it was."""
        if not values:
            return 0
        inserted = 0
        with self._errors("writing captured predictions"):
            self._ensure()
            with self.engine.begin() as conn:
                if self.backend == "postgresql" and self.engine.dialect.driver == "psycopg2":
                    from psycopg2.extras import execute_values
                    try:
                        with conn.connection.driver_connection.cursor() as cur:
                            for i in range(0, len(values), 1000):  # rowcount is the last page's
                                execute_values(cur, _INSERT_SQL.replace("VALUES (%s)", "VALUES %s"),
                                               values[i:i + 1000], page_size=1000)
                                inserted += max(cur.rowcount, 0)
                    except self.engine.dialect.loaded_dbapi.Error as exc:
                        raise sa_exc.DBAPIError.instance(_INSERT_SQL, None, exc, self.engine.dialect.loaded_dbapi.Error,
                                                         dialect=self.engine.dialect) from None
                else:
                    marks = ", ".join(["?" if self.engine.dialect.paramstyle == "qmark" else "%s"] * len(INSERT_COLUMNS))
                    n = conn.exec_driver_sql(_INSERT_SQL.replace("VALUES (%s)", f"VALUES ({marks})"), values).rowcount
                    inserted = len(values) if n is None or n < 0 else n  # sqlite3 sums executemany's changes
        if self.sqlite_path is not None and self._opened is None:  # SQLite makes the file at the first write
            self._note_file(None, None)
        return inserted

    def _select(self, model, since, until, labelled, version):
        p, f = predictions_table, feedback_table
        joined = p.outerjoin(f, sa.and_(f.c.request_id == p.c.request_id, f.c.row == p.c.row, f.c.model == p.c.model))
        q = sa.select(p.c.request_id, p.c.row, p.c.model, p.c.version, p.c.host, p.c.ts, p.c.latency_ms,
                      p.c.inputs, p.c.prediction, f.c.label).select_from(joined).where(p.c.model == model)
        if since is not None:
            q = q.where(p.c.ts >= float(since))
        if until is not None:
            q = q.where(p.c.ts < float(until))
        if version is not None:
            q = q.where(p.c.version == int(version))
        if labelled is True:
            q = q.where(f.c.label.is_not(None))
        elif labelled is False:
            q = q.where(f.c.label.is_(None))
        return q

    @staticmethod
    def _ordered(q, limit: int | None):
        """Oldest first, or the newest ``limit`` newest first."""
        p = predictions_table
        return q.order_by(p.c.ts.desc(), p.c.id.desc()).limit(int(limit)) if limit is not None else q.order_by(p.c.ts, p.c.id)

    def records(self, model: str, since: float | None = None, until: float | None = None, limit: int | None = None,
                labelled: bool | None = None, version: int | None = None) -> list[dict]:
        """Captured rows as dicts (``inputs`` a dict, ``label`` None when none): oldest first, or
        the newest ``limit`` newest first."""
        q = self._ordered(self._select(model, since, until, labelled, version), limit)
        with self._errors("reading captured predictions"):
            if not self._ensure(create=False):
                return []
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
        inputs = _loads_many([r.inputs for r in rows])
        preds = _loads_many([r.prediction for r in rows])
        labels = _loads_many([r.label for r in rows])
        return [{"request_id": r.request_id, "row": r.row, "model": r.model, "version": r.version, "host": r.host,
                 "ts": r.ts, "latency_ms": r.latency_ms, "inputs": i, "prediction": pr, "label": lb}
                for r, i, pr, lb in zip(rows, inputs, preds, labels)]

    def predictions(self, model: str, since: float | None = None, until: float | None = None,
                    limit: int | None = None, labelled: bool | None = None, version: int | None = None):
        """A DataFrame: request_id, row, model, version, host, ts, latency_ms, one column per input
        feature, prediction, label (None/NaN when no label). A feature named like one of the other
        columns appears as ``input.<name>``.

        Read in chunks of READ_CHUNK rows, each turned into columns at once (the inputs' JSON parsed
        by pyarrow into typed columns while the next chunk is fetched; json.loads for what pyarrow
        does not take), so a million rows cost about the bare SELECT and no row is ever a dict."""
        import pandas as pd
        q = self._ordered(self._select(model, since, until, labelled, version), limit)
        meta: dict = {k: [] for k in META}
        preds: list = []
        labels: list = []
        inputs: list = []    # per chunk: (rows, {name: array}) or a Future of it
        strings: dict = {}   # one str object per distinct model / host name
        with self._errors("reading captured predictions"):
            if not self._ensure(create=False):
                return pd.DataFrame({c: pd.Series(dtype=object) for c in META + ("prediction", "label")})
            from concurrent.futures import ThreadPoolExecutor
            with self.engine.connect() as conn, ThreadPoolExecutor(1, thread_name_prefix="mlpipe-read") as pool:
                result = conn.execution_options(stream_results=True, yield_per=READ_CHUNK).execute(q)
                for part in result.partitions(READ_CHUNK):
                    cols = list(zip(*part))
                    del part
                    pending = [f for f in inputs[-3:] if not f.done()]
                    if len(pending) >= 2:  # parsing lags behind: wait, so unparsed text does not pile up
                        pending[0].result()
                    inputs.append(pool.submit(_parse_inputs, cols[7]))
                    meta["request_id"] += cols[0]
                    meta["row"].append(np.fromiter(cols[1], np.int64, len(cols[1])))
                    meta["model"] += [strings.setdefault(v, v) for v in cols[2]]
                    meta["version"].append(np.fromiter(cols[3], np.int64, len(cols[3])))
                    meta["host"] += [strings.setdefault(v, v) for v in cols[4]]
                    meta["ts"].append(np.array(cols[5], dtype=np.float64))
                    meta["latency_ms"].append(np.array(cols[6], dtype=np.float64))
                    preds += _loads_column(cols[8])
                    labels += _loads_column(cols[9])
                    del cols
                inputs = [f.result() for f in inputs]
        if not preds:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in META + ("prediction", "label")})
        data = {k: (np.concatenate(v) if v and isinstance(v[0], np.ndarray) else v) for k, v in meta.items()}
        meta.clear()
        for name, column in _join_columns(inputs).items():
            data[f"input.{name}" if name in META or name in ("prediction", "label") else name] = column
        inputs.clear()
        data["prediction"] = preds
        data["label"] = labels
        return pd.DataFrame(data, copy=False)  # no copy of every column into one block: half the memory

    def count(self, model: str, since: float | None = None) -> int:
        p = predictions_table
        q = sa.select(sa.func.count()).select_from(p).where(p.c.model == model)
        if since is not None:
            q = q.where(p.c.ts >= float(since))
        with self._errors("counting captured predictions"):
            if not self._ensure(create=False):
                return 0
            with self.engine.connect() as conn:
                return int(conn.execute(q).scalar_one())

    # -- feedback -------------------------------------------------------------------------------
    def attach_labels(self, model: str, items: list[tuple[str, int, Any]], source: str) -> dict:
        """Store true labels ``(request_id, row, label)`` for ``model`` in one transaction; a later
        label replaces an earlier one (also within ``items``). Returns {"stored", "matched",
        "unmatched"}: matched = a captured prediction of ``model`` has that request id and row."""
        latest: dict[tuple[str, int], Any] = {}
        for n, item in enumerate(items):
            try:
                request_id, row, label = item
            except (TypeError, ValueError):
                raise UsageError(f"label {n}: expected (request_id, row, label), got {item!r}") from None
            if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
                raise UsageError(f"label {n}: request id {request_id!r} is not a request id",
                                 hint="the X-Request-Id of the prediction: 1-64 characters A-Z a-z 0-9 . _ : -")
            if isinstance(row, bool) or not isinstance(row, int) or row < 0:
                raise UsageError(f"label {n}: row {row!r} is not a row number", hint="0 for the first row of the request")
            if label is None or isinstance(label, (list, dict)) or (isinstance(label, float) and not math.isfinite(label)):
                raise UsageError(f"label {n}: label {label!r} for request {request_id} is not a class or a number")
            latest[(request_id, row)] = label
        if not latest:
            return {"stored": 0, "matched": 0, "unmatched": 0}
        now = time.time()
        values = [{"request_id": rid, "row": row, "model": model, "label": dumps(label), "ts": now,
                   "source": str(source)[:255]} for (rid, row), label in latest.items()]
        stmt = self._insert(feedback_table)
        stmt = stmt.on_conflict_do_update(index_elements=list(KEY),
                                          set_={c: stmt.excluded[c] for c in ("label", "ts", "source")})
        p = predictions_table
        keys = list(latest)
        matched = 0
        with self._errors("storing labels"):
            self._ensure()
            with self.engine.begin() as conn:
                for i in range(0, len(values), 1000):
                    conn.execute(stmt, values[i:i + 1000])
                for i in range(0, len(keys), 500):
                    # by request id alone, so that the (request_id, row) unique index answers: with
                    # model in the WHERE the database picks the (model, ts) index and reads every
                    # row of the model for each chunk (a minute for 100k labels on 1M rows)
                    chunk = keys[i:i + 500]
                    found = conn.execute(sa.select(p.c.request_id, p.c.row, p.c.model).where(
                        p.c.request_id.in_(sorted({k[0] for k in chunk})))).all()
                    matched += len(set(chunk) & {(r.request_id, r.row) for r in found if r.model == model})
        return {"stored": len(values), "matched": matched, "unmatched": len(values) - matched}

    # -- retention ------------------------------------------------------------------------------
    def prune(self, max_age_seconds: float | None, max_rows: int | None, model: str | None = None) -> int:
        """Delete captured predictions older than ``max_age_seconds`` and all but the newest
        ``max_rows`` of each model (None or 0: no limit), of ``model`` only when given (None: every
        model in the database). A label is deleted with its prediction, or, when it has none, once
        it is older than ``max_age_seconds`` (never by a row count: one load's labels share a time).
        Deletes in chunks so a writer in another process is never locked out for long. Returns the
        predictions deleted."""
        p, f = predictions_table, feedback_table
        deleted = 0
        if max_rows is not None and int(max_rows) <= 0:
            max_rows = None
        with self._errors("pruning captured predictions"):
            if not self._ensure(create=False):
                return 0
            if max_age_seconds is not None:
                cutoff = time.time() - float(max_age_seconds)
                where = p.c.ts < cutoff
                deleted += self._delete_chunks(where if model is None else sa.and_(p.c.model == model, where))
                orphan = sa.and_(f.c.ts < cutoff, ~sa.exists().where(
                    p.c.request_id == f.c.request_id, p.c.row == f.c.row, p.c.model == f.c.model))
                with self.engine.begin() as conn:
                    conn.execute(sa.delete(f).where(orphan if model is None else sa.and_(f.c.model == model, orphan)))
            if max_rows is not None:
                if model is None:
                    with self.engine.connect() as conn:
                        models = [r[0] for r in conn.execute(sa.select(p.c.model).distinct()).all()]
                else:
                    models = [model]
                for m in models:
                    with self.engine.connect() as conn:  # the newest row past the limit, by time
                        last = conn.execute(sa.select(p.c.ts, p.c.id).where(p.c.model == m)
                                            .order_by(p.c.ts.desc(), p.c.id.desc()).offset(int(max_rows)).limit(1)).first()
                    if last is not None:
                        deleted += self._delete_chunks(sa.and_(p.c.model == m, sa.or_(
                            p.c.ts < last.ts, sa.and_(p.c.ts == last.ts, p.c.id <= last.id))))
        return deleted

    def _delete_chunks(self, where, chunk: int = 5000) -> int:
        """Delete the predictions ``where`` selects, with their labels, ``chunk`` at a time."""
        p, f = predictions_table, feedback_table
        total = 0
        while True:
            with self.engine.begin() as conn:
                ids = [r[0] for r in conn.execute(sa.select(p.c.id).where(where).limit(chunk)).all()]
                if ids:
                    conn.execute(sa.delete(f).where(sa.exists().where(
                        p.c.id.in_(ids), p.c.request_id == f.c.request_id, p.c.row == f.c.row, p.c.model == f.c.model)))
                    conn.execute(sa.delete(p).where(p.c.id.in_(ids)))
            total += len(ids)
            if len(ids) < chunk:
                return total


# -- the serving side ---------------------------------------------------------------------------
_RECORDERS: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for rec in list(_RECORDERS):
        rec._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Recorder:
    """Captures predictions off the request path, one per serving process.

    ``offer()`` appends to a bounded queue (rows, not requests) and returns; a daemon writer thread,
    started by the first offer() of each process (a forked child starts its own and forgets the
    parent's queue), batches rows into the database. A batch the database refuses is dropped and
    counted (``db_error``); reconnection backs off up to 30 s, and while the database is failing
    rows that do not fit in the queue are counted as ``db_error`` too (``queue_full`` otherwise), and
    while it backs off after a failure offer() drops at once (``db_error``) instead of filling the queue.
    The queue is bounded by rows (``max_queue``) and by the estimated bytes of the requests it holds
    (``max_queue_bytes``, 64 MB: large string inputs), ``queue_full`` past either. Rows whose
    (request_id, row, model) is already stored are not written again (``duplicate``). PostgreSQL writes
    fail after ``statement_timeout``/``lock_timeout`` seconds (5): a locked table costs rows
    (``db_error``), never a writer stuck behind a VACUUM FULL. A SQLite file deleted or replaced under
    it is noticed every cycle (one os.stat) and created again. It prunes only the models it captured.

    The writer runs inside the serving process and needs its interpreter lock, so its CPU time is
    taken from predictions: it is paced to ``max_cpu_share`` of one core (after a batch that took
    t seconds of CPU it rests t * (1 - share) / share seconds). When the traffic offers more rows
    than that share can write, the queue fills and the excess is dropped (``queue_full``): capture
    costs rows, never throughput. ``flush()`` and ``close()`` skip the rests.
    """

    def __init__(self, url: str | None, host: str, max_queue: int = 10000, flush_interval: float = 0.5,
                 batch_rows: int = 1000, max_age_seconds: float | None = 30 * 86400, max_rows: int | None = 1_000_000,
                 prune_every: float = 600, max_cpu_share: float = 0.02, max_queue_bytes: int | None = MAX_QUEUE_BYTES,
                 statement_timeout: float | None = WRITE_TIMEOUT, lock_timeout: float | None = WRITE_TIMEOUT):
        self.url = db_url(url)
        self.max_queue_bytes = None if not max_queue_bytes else int(max_queue_bytes)
        self.statement_timeout, self.lock_timeout = statement_timeout, lock_timeout
        self.shown = redact(self.url)
        self.host = str(host)[:255]
        self.max_queue = int(max_queue)
        self.flush_interval = float(flush_interval)
        self.batch_rows = max(1, int(batch_rows))
        self.max_age_seconds = max_age_seconds
        self.max_rows = max_rows
        self.prune_every = prune_every
        self.max_cpu_share = min(1.0, max(0.001, float(max_cpu_share)))
        self._inherited: list = []  # a parent's engines, kept so that closing them never touches its connections
        self._reset()
        _RECORDERS.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fork_gen = _FORKS[0]
        self._lock = threading.Lock()
        self._items: collections.deque = collections.deque()
        self._queued = 0
        self._queued_bytes = 0
        self._inflight = 0
        self._models: set = set()  # the models this process offered rows for: the ones it prunes
        self._backing_off_until = 0.0  # monotonic: offers are dropped (db_error) until then
        self._captured = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._failing = False
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._hurry = threading.Event()  # flush()/close() waiting: no rests between batches
        self._stopping = False
        self._closed = False
        self._retry_now = False
        self._store: Store | None = None

    def _forked(self) -> None:
        self._fork_gen = _FORKS[0]
        if self._pid == os.getpid():
            return
        if self._store is not None:
            self._inherited.append(self._store)
        self._reset()

    # -- request path ---------------------------------------------------------------------------
    def offer(self, model, version, request_id, features, X, predictions, latency_ms) -> None:
        """Queue one request's rows for capture. Never blocks on the database, never raises."""
        try:
            if self._fork_gen != _FORKS[0]:  # not a getpid() per request: a counter os.register_at_fork moves
                self._forked()
            n = len(predictions) if hasattr(predictions, "__len__") else 1
            if self._failing and time.monotonic() < self._backing_off_until:
                with self._lock:  # the database failed just now: do not hold rows for it (nor size them)
                    self._dropped["db_error"] += n
                return
            # numeric arrays (the common case) sized inline; anything else estimated by _size
            size = (X.nbytes if type(X) is np.ndarray and X.dtype.kind != "O"
                    else 32 * n * len(X[0]) if type(X) is list and X and type(X[0]) is list  # rows of numbers
                    else _size(X)) + (
                predictions.nbytes if type(predictions) is np.ndarray and predictions.dtype.kind != "O"
                else 32 * n if type(predictions) is list and n and type(predictions[0]) in (int, float)  # numbers
                else _size(predictions))
            item = (time.time(), model, version, request_id, features, X, predictions, latency_ms, size, n)
            with self._lock:
                if self._closed:
                    return
                if self._queued + n > self.max_queue or (
                        self.max_queue_bytes is not None and self._queued_bytes + size > self.max_queue_bytes):
                    self._dropped["db_error" if self._failing else "queue_full"] += n
                    return
                self._items.append(item)
                self._queued += n
                self._queued_bytes += size
                start = self._thread is None
                if start:
                    self._thread = threading.Thread(target=self._run, name="mlpipe-capture", daemon=True)
            if start:
                self._thread.start()
            if self._queued >= self.batch_rows and not self._wake.is_set():
                self._wake.set()
        except Exception:  # capture must never cost a prediction
            pass

    def stats(self) -> dict:
        if self._pid != os.getpid():
            self._forked()
        with self._lock:
            return {"captured": self._captured, "dropped": dict(self._dropped), "queued": self._queued + self._inflight}

    # -- tests and shutdown ---------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Write what is queued now (skipping any reconnect backoff). True when the queue emptied
        within ``timeout`` (the rows were written or counted as dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                idle = self._queued == 0 and self._inflight == 0
                alive = self._thread is not None and self._thread.is_alive()
            if idle:
                return True
            if not alive or time.monotonic() > deadline:
                return False
            self._retry_now = True
            self._backing_off_until = 0.0
            self._hurry.set()
            self._wake.set()
            time.sleep(0.02)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop taking rows, write what is queued (within ``timeout``) and stop the writer."""
        with self._lock:
            self._closed = True
            thread = self._thread
        drained = self.flush(timeout) if thread is not None else True
        self._stopping = True
        self._hurry.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.1, timeout))
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        return drained

    # -- the writer thread ----------------------------------------------------------------------
    def _take(self) -> list:
        batch, rows, size = [], 0, 0
        with self._lock:
            while self._items and (not batch or rows + self._items[0][-1] <= self.batch_rows):
                item = self._items.popleft()
                batch.append(item)
                rows += item[-1]
                size += item[-2]
            self._queued -= rows
            self._queued_bytes -= size
            self._inflight = rows
        return batch

    def _rows(self, batch: list) -> tuple[list[tuple], int]:
        """Queue items -> table rows (the JSON work happens here, not on the request path), a whole
        request at a time (see ``_inputs_json``)."""
        out, invalid = [], 0
        host = self.host
        for k, item in enumerate(batch):  # rows of floats as a server's fast path hands them: a matrix, here
            X = item[5]
            if type(X) is list and X and all(type(r) is list and len(r) == len(X[0]) and all(type(v) is float for v in r)
                                             for r in X):
                batch[k] = (*item[:5], np.asarray(X, dtype=np.float64), *item[6:])
        ready = _numeric_inputs_json(batch)
        for k, (ts, model, version, request_id, features, X, preds, latency_ms, _size_, n) in enumerate(batch):
            try:
                if not isinstance(request_id, str) or not request_id or len(request_id) > 64:
                    raise ValueError("bad request id")
                inputs = ready.get(k)
                if inputs is None:
                    inputs = _inputs_json(features, X)
                values = _json_texts(preds.tolist() if hasattr(preds, "tolist") else
                                     list(preds) if hasattr(preds, "__len__") else [preds])
                if len(values) != len(inputs):
                    raise ValueError("rows and predictions differ")
                model, version = str(model)[:64], int(version)
                self._models.add(model)
                latency_ms = None if latency_ms is None else float(latency_ms)
                out += [(request_id, i, model, version, host, ts, latency_ms, inp, pred)
                        for i, (inp, pred) in enumerate(zip(inputs, values))]
            except Exception:
                invalid += n
        return out, invalid

    def _run(self) -> None:
        state = {"backoff": 0.0, "retry_at": 0.0, "error": "",
                 "next_prune": time.monotonic() + (random.uniform(0.1, 1.0) * self.prune_every if self.prune_every else 0),
                 "last_log": dict.fromkeys(DROP_REASONS + ("prune",), -math.inf),
                 "logged": dict.fromkeys(DROP_REASONS, 0)}
        while True:
            try:
                if self._cycle(state):
                    return
            except Exception:  # a bug here must not stop capture for the life of the worker
                log.exception("capture: the writer thread failed; going on")
                with self._lock:
                    self._dropped["invalid"] += self._inflight
                    self._inflight = 0
                time.sleep(1.0)

    def _cycle(self, state: dict) -> bool:
        """One wake-up of the writer: write what is queued (unless backing off), prune when due,
        report drops. True when the recorder is closing."""
        self._wake.wait(self.flush_interval)
        self._wake.clear()
        self._hurry.clear()
        stopping = self._stopping
        now = time.monotonic()
        if now >= state["retry_at"] or self._retry_now:
            self._retry_now = False
            while True:
                batch = self._take()
                if not batch:
                    break
                cpu = time.thread_time()
                rows, invalid = self._rows(batch)
                if self._store is not None and self._store.file_replaced():  # one os.stat per batch
                    log.warning("capture: the SQLite file %s was deleted or replaced: creating it again (rows "
                                "written to the old file since it went are lost)", self.shown)
                try:
                    if self._store is None:
                        self._store = Store(self.url, statement_timeout=self.statement_timeout,
                                            lock_timeout=self.lock_timeout)
                    inserted = self._store.write_tuples(rows)
                except Exception as exc:
                    state["error"] = str(exc)
                    with self._lock:
                        self._dropped["db_error"] += len(rows)
                        self._dropped["invalid"] += invalid
                        self._inflight = 0
                        self._failing = True
                    state["backoff"] = min(MAX_BACKOFF, state["backoff"] * 2 or 1.0)
                    state["retry_at"] = time.monotonic() + state["backoff"]
                    self._backing_off_until = state["retry_at"]
                    if self._store is not None:
                        self._store.engine.dispose()
                        self._store._schema = False  # look at the tables again (a database rebuilt empty)
                    break
                with self._lock:
                    self._captured += inserted
                    self._dropped["duplicate"] += len(rows) - inserted  # a request id already captured for the model
                    self._dropped["invalid"] += invalid
                    self._inflight = 0
                    recovered, self._failing = self._failing, False
                if recovered:
                    log.warning("capture database %s is reachable again: capturing predictions", self.shown)
                state["backoff"] = 0.0
                self._rest(time.thread_time() - cpu)
            if (self.prune_every and not self._failing and self._store is not None
                    and time.monotonic() >= state["next_prune"]
                    and (self.max_age_seconds is not None or self.max_rows is not None)):
                state["next_prune"] = time.monotonic() + self.prune_every
                cpu = time.thread_time()
                try:  # only the models served here: others in a shared database have their own settings
                    n = sum(self._store.prune(self.max_age_seconds, self.max_rows, model=m) for m in sorted(self._models))
                    if n:
                        log.info("capture: pruned %d captured predictions from %s", n, self.shown)
                except Exception as exc:
                    if time.monotonic() - state["last_log"]["prune"] >= LOG_EVERY:
                        state["last_log"]["prune"] = time.monotonic()
                        log.warning("capture: pruning %s failed: %s", self.shown, exc)
                self._rest(time.thread_time() - cpu)
        self._report(state["last_log"], state["logged"], state["error"])
        return stopping

    def _rest(self, cpu: float) -> None:
        """After ``cpu`` seconds of work, wait so that the writer stays within ``max_cpu_share``."""
        share = self.max_cpu_share
        if share < 1.0 and cpu > 0 and not self._stopping:
            self._hurry.wait(min(cpu * (1.0 - share) / share, 10.0))

    def _report(self, last_log: dict, logged: dict, error: str) -> None:
        """At most one warning per reason per LOG_EVERY seconds, with the rows dropped since the last one."""
        now = time.monotonic()
        with self._lock:
            dropped = dict(self._dropped)
        why = {"db_error": f"the capture database failed: {error}; predictions are unaffected, check {self.shown}",
               "queue_full": f"the capture queue ({self.max_queue} rows, {self.max_queue_bytes or 0} bytes) is full: {self.shown} is slower than the "
                             "traffic; lower capture_sample or speed up the database",
               "invalid": "the rows could not be converted for the database",
               "duplicate": "their request id and row were already captured for the model (a client reusing "
                            "X-Request-Id)"}
        for reason in DROP_REASONS:
            new = dropped[reason] - logged[reason]
            if new > 0 and now - last_log[reason] >= LOG_EVERY:
                log.warning("capture: %d rows dropped (%s): %s", new, reason, why[reason])
                last_log[reason] = now
                logged[reason] = dropped[reason]
