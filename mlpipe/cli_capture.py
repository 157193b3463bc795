"""``mlpipe predictions`` (what the serving hosts captured) and ``mlpipe feedback`` (true labels for
captured predictions): thin wrappers over mlpipe.capture. The database is ``--db`` or
MLPIPE_CAPTURE_DB (default a SQLite file under MLPIPE_FLEET_ROOT or ~/.mlpipe)."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from mlpipe.errors import UsageError

MAX_AGE_DEFAULT = "30d"
MAX_ROWS_DEFAULT = 1_000_000
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
FEEDBACK_COLUMNS = ("request_id", "label", "row")


def _db_option(f):
    return click.option("--db", "db", envvar="MLPIPE_CAPTURE_DB", default=None, metavar="URL",
                        help="Capture database, a SQLAlchemy URL [env MLPIPE_CAPTURE_DB; default a SQLite file "
                             "under MLPIPE_FLEET_ROOT or ~/.mlpipe].")(f)


def _json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(f)


def _out(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _seconds(value: str, option: str) -> int:
    from mlpipe.errors import SpecError
    from mlpipe.spec import parse_duration
    try:
        return parse_duration(value, option)
    except SpecError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None


def _store(db):
    from mlpipe.capture import Store
    return Store(db)


@click.group()
def predictions():
    """What the serving hosts captured: a sampled share of requests with their inputs, prediction,
    version, host, request id, time and latency (spec key capture.sample; serve --capture-sample).

    \b
    Example:
      mlpipe predictions list credit-risk --since 1h
      mlpipe predictions prune --max-age 30d --max-rows 1000000
    """


def _cell(value, width: int = 12) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@predictions.command("list")
@click.argument("model")
@click.option("--since", default="1h", show_default=True, help="How far back: 90s, 30m, 1h, 2d, 1w.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1), help="The newest N at most.")
@click.option("--labelled", is_flag=True, help="Only predictions that have a feedback label.")
@_db_option
@_json_option
def predictions_list(model, since, limit, labelled, db, as_json):
    """The newest captured predictions of MODEL, newest first (time in UTC).

    \b
    Example:
      mlpipe predictions list credit-risk --since 1h --limit 20
      mlpipe predictions list credit-risk --since 2d --labelled --json
    """
    window = _seconds(since, "--since")
    store = _store(db)
    try:
        rows = store.records(model, since=time.time() - window, limit=limit, labelled=True if labelled else None)
    finally:
        store.close()
    if as_json:
        _out([dict(r, time=datetime.fromtimestamp(r["ts"], timezone.utc).isoformat()) for r in rows])
        return
    if not rows:
        click.echo(f"no {'labelled ' if labelled else ''}captured predictions of {model} in the last {since} "
                   f"in {store.shown}")
        return
    table = [("TIME (UTC)", "REQUEST ID", "VERSION", "HOST", "LATENCY", "PREDICTION", "LABEL")]
    for r in rows:
        request = r["request_id"] if r["row"] == 0 else f"{r['request_id']}#{r['row']}"
        latency = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f} ms"
        table.append((_time(r["ts"]), request, f"v{r['version']}", r["host"], latency,
                      _cell(r["prediction"]), _cell(r["label"])))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


@predictions.command("prune")
@click.option("--max-age", default=MAX_AGE_DEFAULT, show_default=True,
              help="Delete what is older than this (90s, 30m, 6h, 30d, 1w).")
@click.option("--max-rows", default=MAX_ROWS_DEFAULT, show_default=True, type=click.IntRange(0),
              help="Keep at most this many captured predictions per model (the newest); 0: no row limit.")
@click.option("--model", default=None, metavar="NAME",
              help="Prune only this model's predictions and labels [default: every model in the database].")
@_db_option
@_json_option
def predictions_prune(max_age, max_rows, model, db, as_json):
    """Delete old captured predictions and labels (the servers do this every 10 minutes by
    themselves, for the models they serve, with their capture_max_age and capture_max_rows
    settings). A label goes with its prediction, or by age when it has none.

    \b
    Example:
      mlpipe predictions prune --max-age 7d --max-rows 200000 --model credit-risk
    """
    age = _seconds(max_age, "--max-age")
    store = _store(db)
    try:
        deleted = store.prune(age, max_rows or None, model=model)
    finally:
        store.close()
    if as_json:
        _out({"deleted": deleted, "max_age_seconds": age, "max_rows": max_rows or None, "model": model})
    else:
        rows = f"beyond {max_rows} per model" if max_rows else "any number (no row limit)"
        click.echo(f"deleted {deleted} captured predictions older than {max_age} or {rows}"
                   f"{' of ' + model if model else ''} from {store.shown}")


@click.group()
def feedback():
    """True labels for captured predictions, by request id (the X-Request-Id of each response).
    Labelled predictions are a data source: predictions:MODEL?labelled=true&since=30d.

    \b
    Example:
      mlpipe feedback load credit-risk labels.csv
    """


def _label(value, where: str):
    """A label as the model knows it: numbers stay numbers (int when integral), text stays text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{where}: label {value!r} is not a finite number")
        return int(value) if float(value).is_integer() and abs(value) < 2 ** 63 else value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise UsageError(f"{where}: the label is empty", hint="write the true class or value of the prediction")
        return text
    raise UsageError(f"{where}: label {value!r} is not a class or a number",
                     hint='write a string or a number, e.g. {"request_id": "...", "label": 1}')


def _row(value, where: str) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise UsageError(f"{where}: row {value!r} is not a row number")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    raise UsageError(f"{where}: row {value!r} is not a row number",
                     hint="row is the input's position in the request, 0 for the first (the default)")


def _request_id(value, where: str) -> str:
    from mlpipe.capture import REQUEST_ID_RE
    if isinstance(value, str) and REQUEST_ID_RE.match(value.strip()):
        return value.strip()
    if value is None or value == "":
        raise UsageError(f"{where}: request_id is missing", hint="the X-Request-Id header of the prediction's response")
    raise UsageError(f"{where}: request_id {value!r} is not a request id",
                     hint="the X-Request-Id of the prediction: 1-64 characters A-Z a-z 0-9 . _ : -")


def _csv_label(text: str, where: str):
    text = text.strip()
    if _NUMBER_RE.match(text):
        return _label(float(text) if any(c in text for c in ".eE") else int(text), where)
    return _label(text, where)


def _read_csv(path: Path, text: str) -> list[tuple[str, int, object]]:
    reader = csv.reader(io.StringIO(text))
    header = None
    items = []
    for record in reader:
        line = reader.line_num
        where = f"{path}:{line}"
        if not record or all(not c.strip() for c in record):
            continue
        if header is None:
            header = [c.strip() for c in record]
            unknown = [c for c in header if c not in FEEDBACK_COLUMNS]
            missing = [c for c in ("request_id", "label") if c not in header]
            if unknown or missing or len(set(header)) != len(header):
                problem = (f"unknown column {unknown[0]!r}" if unknown else f"no {missing[0]} column" if missing
                           else "a column is named twice")
                raise UsageError(f"{where}: {problem} in the header {','.join(header)!r}",
                                 hint="the first line is request_id,label or request_id,label,row")
            continue
        if len(record) != len(header):
            raise UsageError(f"{where}: {len(record)} fields, the header has {len(header)}",
                             hint="quote a label that contains a comma" if len(record) > len(header)
                             else f"write {','.join(header)} on every line")
        values = dict(zip(header, record))
        items.append((_request_id(values["request_id"], where), _row(values.get("row"), where),
                      _csv_label(values["label"], where)))
    if header is None:
        raise UsageError(f"{path} is empty", hint="write a header request_id,label then one line per label")
    return items


def _read_jsonl(path: Path, text: str) -> list[tuple[str, int, object]]:
    items = []
    for line, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{line}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"{where}: not JSON ({exc.msg} at column {exc.colno})",
                             hint='one object per line: {"request_id": "...", "label": 1}') from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: a JSON {type(obj).__name__}, not an object",
                             hint='one object per line (JSON lines): {"request_id": "...", "label": 1}')
        unknown = [k for k in obj if k not in FEEDBACK_COLUMNS]
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r}", hint="the keys are request_id, label and row")
        if "label" not in obj:
            raise UsageError(f"{where}: no label", hint='write {"request_id": "...", "label": 1}')
        items.append((_request_id(obj.get("request_id"), where), _row(obj.get("row"), where), _label(obj["label"], where)))
    return items


def read_labels(path: str | Path) -> list[tuple[str, int, object]]:
    """(request_id, row, label) from a CSV file (header request_id,label[,row]) or JSON lines; every
    line is checked before anything is returned, and a bad one names its file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", hint="a UTF-8 CSV or JSON lines file") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        is_json = False
    elif suffix in (".jsonl", ".json", ".ndjson"):
        is_json = True
    else:
        is_json = text.lstrip().startswith(("{", "["))
    items = _read_jsonl(path, text) if is_json else _read_csv(path, text)
    if not items:
        raise UsageError(f"{path} holds no labels", hint="one line per label: request_id,label")
    return items


@feedback.command("load")
@click.argument("model")
@click.argument("file", type=click.Path(dir_okay=False))
@_db_option
@_json_option
def feedback_load(model, file, db, as_json):
    """Attach the true labels in FILE to MODEL's captured predictions: CSV with a header
    request_id,label[,row] or JSON lines {"request_id": ..., "label": ..., "row": 0}. Every line is
    checked first; a bad one stops the load with its line number and nothing is stored. A later
    label for the same request replaces an earlier one.

    \b
    Example:
      mlpipe feedback load credit-risk labels.csv
      mlpipe feedback load credit-risk outcomes.jsonl --json
    """
    from mlpipe.spec import NAME_RE
    if not NAME_RE.match(model):
        raise UsageError(f"{model!r} is not a model name", hint="lowercase letters, digits and '-', e.g. credit-risk")
    items = read_labels(file)
    store = _store(db)
    try:
        result = store.attach_labels(model, items, source=f"file:{Path(file).name}")
    finally:
        store.close()
    if as_json:
        _out(dict(result, model=model))
    else:
        click.echo(f"stored {result['stored']} labels for {model}: {result['matched']} matched a captured prediction, "
                   f"{result['unmatched']} did not")
