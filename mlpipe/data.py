"""Data sources and their fingerprints.

A source is a URI: ``sklearn:NAME`` (data sets scikit-learn ships), ``csv:PATH``,
``parquet:PATH``, ``s3://bucket/key.(csv|parquet)``, ``sql:SQLALCHEMY_URL#QUERY``,
``predictions:MODEL?labelled=true&since=30d`` (what the serving hosts captured, with the labels fed
back: the features and the label in column ``target``, default ``label``; the capture database is
MLPIPE_CAPTURE_DB).
The fingerprint is a sha256 of the frame's content (column names, dtypes and every value),
independent of file format, so "is there new data?" means the content changed.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mlpipe.errors import DataError

SCHEMES = ("sklearn:", "csv:", "parquet:", "s3://", "sql:", "predictions:")
PREDICTIONS_KEYS = ("labelled", "since", "target", "version", "limit")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass
class Dataset:
    frame: pd.DataFrame
    source: str

    @property
    def rows(self) -> int:
        return len(self.frame)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.frame)


def redact_source(uri: str) -> str:
    """The source URI with any password masked (``sql:postgresql://u:***@h/db#query``): what
    manifests, ledgers and messages show. Loading needs the real URI."""
    if not isinstance(uri, str) or "://" not in uri or uri.startswith("predictions:"):
        return uri  # nothing secret in it: the database comes from MLPIPE_CAPTURE_DB
    if uri.startswith("sql:"):
        url, sep, query = uri[len("sql:"):].partition("#")
        try:
            from sqlalchemy.engine import make_url
            parsed = make_url(url)
            safe = parsed.render_as_string(hide_password=True) if parsed.password is not None else url
        except Exception:  # not a URL SQLAlchemy parses: mask user:password@ by hand
            safe = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)
        return f"sql:{safe}{sep}{query}"
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", uri)


def check_source_uri(uri: str) -> None:
    if not isinstance(uri, str) or not uri.startswith(SCHEMES):
        raise DataError(f"unsupported data source {redact_source(uri)!r}",
                        hint="use sklearn:NAME, csv:PATH, parquet:PATH, s3://BUCKET/KEY.csv, sql:URL#QUERY "
                             "or predictions:MODEL?labelled=true&since=30d")
    if uri.startswith("sql:") and "#" not in uri:
        raise DataError(f"sql source {redact_source(uri)!r} has no query",
                        hint="write sql:sqlite:///path.db#SELECT * FROM table")
    if uri.startswith("predictions:"):
        parse_predictions_uri(uri)


def parse_predictions_uri(uri: str) -> dict:
    """``predictions:MODEL?labelled=true&since=30d&target=label&version=N&limit=N`` -> {"model",
    "labelled" (bool or None), "since" (seconds or None), "target", "version", "limit"}."""
    from urllib.parse import parse_qsl
    from mlpipe.errors import SpecError
    from mlpipe.spec import NAME_RE, parse_duration
    example = "write predictions:credit-risk?labelled=true&since=30d (keys: " + ", ".join(PREDICTIONS_KEYS) + ")"
    model, _, query = uri[len("predictions:"):].partition("?")
    if not NAME_RE.match(model):
        raise DataError(f"predictions source {uri!r} does not name a model ({model!r})", hint=example)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise DataError(f"predictions source {uri!r}: cannot read the query {query!r}", hint=example) from None
    out = {"model": model, "labelled": None, "since": None, "target": "label", "version": None, "limit": None}
    seen = set()
    for key, value in pairs:
        if key not in PREDICTIONS_KEYS:
            raise DataError(f"predictions source {uri!r}: unknown key {key!r}", hint=example)
        if key in seen:
            raise DataError(f"predictions source {uri!r}: {key!r} is given twice", hint=example)
        seen.add(key)
        if key == "labelled":
            if value.lower() not in _TRUE + _FALSE:
                raise DataError(f"predictions source {uri!r}: labelled={value!r} is not true or false",
                                hint="labelled=true keeps only predictions with a feedback label")
            out[key] = value.lower() in _TRUE
        elif key == "since":
            try:
                out[key] = parse_duration(value, "since")
            except SpecError as exc:
                raise DataError(f"predictions source {uri!r}: {exc.message}", hint=exc.hint) from None
        elif key == "target":
            if not value.strip():
                raise DataError(f"predictions source {uri!r}: target is empty",
                                hint="name the column the label goes in, e.g. target=label")
            out[key] = value
        elif not value.isdigit() or (key == "limit" and int(value) == 0):
            raise DataError(f"predictions source {uri!r}: {key}={value!r} is not a {'positive ' if key == 'limit' else ''}"
                            "whole number", hint=example)
        else:
            out[key] = int(value)
    return out


def _predictions(uri: str) -> pd.DataFrame:
    """The captured inputs of a model and the label of each (NaN when none) in column ``target``."""
    import time
    from mlpipe import capture
    from mlpipe.errors import MlpipeError
    q = parse_predictions_uri(uri)
    try:
        store = capture.Store()
    except MlpipeError as exc:
        raise DataError(f"cannot read {uri}: {exc.message}", hint=exc.hint) from None
    try:
        since = time.time() - q["since"] if q["since"] is not None else None
        frame = store.predictions(q["model"], since=since, limit=q["limit"], labelled=q["labelled"], version=q["version"])
    except MlpipeError as exc:
        raise DataError(f"cannot read {uri}: {exc.message}", hint=exc.hint) from None
    finally:
        store.close()
    if frame.empty:
        what = "labelled " if q["labelled"] else ""
        raise DataError(f"no {what}captured predictions of {q['model']} match {uri} in {store.shown}",
                        hint="check MLPIPE_CAPTURE_DB, the model's capture.sample, and `mlpipe predictions list "
                             f"{q['model']}`" + ("; feed labels back with `mlpipe feedback load`" if q["labelled"] else ""))
    from mlpipe.capture import META
    features = [c for c in frame.columns if c not in META and c not in ("prediction", "label")]
    if q["limit"] is not None:
        frame = frame.iloc[::-1]  # the newest N, oldest first like every other source
    out = frame[features].copy()
    if q["target"] in out.columns:
        raise DataError(f"predictions source {uri!r}: target {q['target']!r} is also a feature of {q['model']}",
                        hint="name another column for the label, e.g. target=true_label")
    out[q["target"]] = _labels(frame, uri)
    return out.reset_index(drop=True)


def _labels(frame: pd.DataFrame, uri: str):
    """Fed-back labels as one column type: numbers (int when all are whole) or strings. Labels arrive
    from many clients; a mix (a "yes" among 0/1) would fail deep in scikit-learn, so it is refused here,
    naming the request ids to correct."""
    import numbers

    import numpy as np
    labels = frame["label"].to_numpy(dtype=object)
    present = [v for v in labels if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not present:
        return labels
    is_num = np.array([isinstance(v, numbers.Number) and not isinstance(v, bool) for v in labels])
    is_str = np.array([isinstance(v, str) for v in labels])
    if is_num.any() and is_str.any():
        minority = is_str if is_str.sum() <= is_num.sum() else is_num
        ids = frame["request_id"].to_numpy()[minority][:5].tolist()
        kind = "text" if minority is is_str else "numeric"
        raise DataError(f"{uri}: the fed-back labels mix numbers and text ({int(minority.sum())} {kind} label(s), "
                        f"e.g. request ids {', '.join(map(str, ids))})",
                        hint="send the right label for those requests again (a later label replaces an earlier one: "
                             "mlpipe feedback load MODEL FILE or POST /feedback)")
    if is_num.any():
        values = pd.to_numeric(pd.Series(labels), errors="coerce")
        whole = values.dropna()
        if len(whole) == len(values) and (whole == np.round(whole)).all():
            return values.astype("int64").to_numpy()
        return values.to_numpy()
    return labels


def resolve_relative(uri: str, base: Path) -> str:
    for scheme in ("csv:", "parquet:"):
        if uri.startswith(scheme):
            p = Path(uri[len(scheme):])
            if not p.is_absolute() and not p.exists() and (base / p).exists():
                return scheme + str((base / p).resolve())
    return uri


def row_hashes(frame: pd.DataFrame):
    """One uint64 per row (pandas' hash of the row's values, index ignored): what the fingerprint is
    made of, and what ``mlpipe retrain`` compares to count new rows."""
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def fingerprint(frame: pd.DataFrame, hashes=None) -> str:
    """sha256 of the column names, dtypes and every row's hash (pass ``hashes`` when you have them)."""
    h = hashlib.sha256()
    h.update(repr([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    h.update((row_hashes(frame) if hashes is None else hashes).tobytes())
    return h.hexdigest()


def _sklearn(name: str) -> pd.DataFrame:
    import sklearn.datasets as ds
    loader = getattr(ds, f"load_{name}", None)
    if loader is None:
        shipped = sorted(n[5:] for n in dir(ds) if n.startswith("load_") and n not in ("load_files", "load_svmlight_file", "load_svmlight_files", "load_sample_image", "load_sample_images"))
        raise DataError(f"unknown scikit-learn data set '{name}'", hint=f"shipped data sets: {', '.join(shipped)}")
    try:
        bunch = loader(as_frame=True)
    except TypeError:
        raise DataError(f"scikit-learn data set '{name}' cannot be loaded as a table") from None
    return bunch.frame


def _s3_client():
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=os.environ.get("MLPIPE_S3_ENDPOINT_URL") or None,
                        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30))


def _s3(uri: str) -> pd.DataFrame:
    from botocore.exceptions import BotoCoreError, ClientError
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise DataError(f"s3 source {uri!r} needs a bucket and a key", hint="write s3://bucket/path/data.csv")
    try:
        body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise DataError(f"cannot read {uri}: {code or exc}",
                        hint="check the bucket and key, and the credentials in the environment") from None
    except BotoCoreError as exc:
        raise DataError(f"cannot reach S3 for {uri}: {exc}",
                        hint="check MLPIPE_S3_ENDPOINT_URL and the network") from None
    if key.endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(body))
    return pd.read_csv(io.BytesIO(body))


def _sql(uri: str) -> pd.DataFrame:
    import sqlalchemy
    url, _, query = uri[len("sql:"):].partition("#")
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            return pd.read_sql(sqlalchemy.text(query), conn)
    except Exception as exc:  # driver errors vary; keep the message, drop credentials
        safe = redact_source(f"sql:{url}")[len("sql:"):]
        raise DataError(f"cannot run query on {safe}: {str(exc).splitlines()[0]}",
                        hint="check the URL, the table and the query") from None


def load(uri: str) -> Dataset:
    """Read a source. The Dataset's ``source`` is the URI with any password masked."""
    check_source_uri(uri)
    shown = redact_source(uri)
    try:
        if uri.startswith("sklearn:"):
            frame = _sklearn(uri[len("sklearn:"):])
        elif uri.startswith("csv:"):
            frame = pd.read_csv(uri[len("csv:"):])
        elif uri.startswith("parquet:"):
            frame = pd.read_parquet(uri[len("parquet:"):])
        elif uri.startswith("s3://"):
            frame = _s3(uri)
        elif uri.startswith("predictions:"):
            frame = _predictions(uri)
        else:
            frame = _sql(uri)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"data file for {shown} not found", hint="check the path (relative paths are relative to the spec's folder)") from None
    except Exception as exc:
        raise DataError(f"cannot read {shown}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if frame.empty:
        raise DataError(f"data source {shown} has no rows")
    return Dataset(frame=frame, source=shown)


def split_xy(ds: Dataset, target: str, features: list | None = None):
    cols = list(ds.frame.columns)
    if target not in cols:
        raise DataError(f"target column '{target}' not in {ds.source}",
                        hint=f"columns are: {', '.join(map(str, cols[:20]))}{' ...' if len(cols) > 20 else ''}")
    if features:
        missing = [f for f in features if f not in cols]
        if missing:
            raise DataError(f"feature column(s) {', '.join(missing)} not in {ds.source}",
                            hint=f"columns are: {', '.join(map(str, cols[:20]))}")
    else:
        features = [c for c in cols if c != target]
    return ds.frame[features], ds.frame[target]
