import sqlite3

import boto3
import pytest

from mlpipe import data
from mlpipe.errors import DataError


@pytest.fixture
def frame():
    return data.load("sklearn:iris").frame


def test_sklearn_source(frame):
    assert len(frame) == 150 and "target" in frame.columns


def test_unknown_sklearn_dataset():
    with pytest.raises(DataError, match="unknown scikit-learn data set 'irises'.*iris"):
        data.load("sklearn:irises")


def test_fingerprint_same_content_any_format(tmp_path, frame):
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    a = data.load(f"csv:{tmp_path / 'd.csv'}")
    b = data.load(f"parquet:{tmp_path / 'd.parquet'}")
    assert a.rows == b.rows == 150
    assert a.fingerprint == b.fingerprint == data.fingerprint(frame)


def test_fingerprint_changes_with_one_value(frame):
    other = frame.copy()
    other.iloc[7, 0] += 0.1
    assert data.fingerprint(other) != data.fingerprint(frame)
    assert data.fingerprint(frame.iloc[:-1]) != data.fingerprint(frame)


def test_sql_source(tmp_path, frame):
    db = tmp_path / "d.db"
    with sqlite3.connect(db) as conn:
        frame.to_sql("iris", conn, index=False)
    ds = data.load(f"sql:sqlite:///{db}#SELECT * FROM iris WHERE target = 1")
    assert ds.rows == 50
    with pytest.raises(DataError, match="cannot run query.*no such table"):
        data.load(f"sql:sqlite:///{db}#SELECT * FROM nope")


def test_missing_file():
    with pytest.raises(DataError, match="not found"):
        data.load("csv:/nonexistent/x.csv")


def test_missing_target(frame):
    with pytest.raises(DataError, match="target column 'label' not in.*columns are: sepal length"):
        data.split_xy(data.Dataset(frame, "sklearn:iris"), "label")


def test_missing_feature(frame):
    with pytest.raises(DataError, match="feature column\\(s\\) petal size not in"):
        data.split_xy(data.Dataset(frame, "sklearn:iris"), "target", ["petal size"])


@pytest.mark.integration
def test_s3_csv_and_parquet(s3_bucket, moto_endpoint, frame, tmp_path):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="in/iris.csv", Body=frame.to_csv(index=False).encode())
    frame.to_parquet(tmp_path / "x.parquet", index=False)
    s3.put_object(Bucket=s3_bucket, Key="in/iris.parquet", Body=(tmp_path / "x.parquet").read_bytes())
    a = data.load(f"s3://{s3_bucket}/in/iris.csv")
    b = data.load(f"s3://{s3_bucket}/in/iris.parquet")
    assert a.fingerprint == b.fingerprint == data.fingerprint(frame)
    with pytest.raises(DataError, match="NoSuchKey"):
        data.load(f"s3://{s3_bucket}/in/missing.csv")


def test_s3_unreachable(monkeypatch):
    from conftest import free_port
    monkeypatch.setenv("MLPIPE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DataError, match="cannot reach S3"):
        data.load("s3://bucket/x.csv")


def test_sql_password_never_in_messages_or_source():
    assert data.redact_source("sql:postgresql://u:secret@h/db#select 1") == "sql:postgresql://u:***@h/db#select 1"
    assert data.redact_source("sql:sqlite:////tmp/x.db#select 1") == "sql:sqlite:////tmp/x.db#select 1"
    for uri in ("sql:postgresql://u:secret@h/db", "sql:postgresql://u:secret@127.0.0.1:1/db#select 1"):
        with pytest.raises(DataError) as info:
            data.load(uri)
        assert "secret" not in str(info.value) and "u:***@" in str(info.value)
