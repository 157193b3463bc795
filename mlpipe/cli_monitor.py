"""``mlpipe monitor``: the command cron runs every few minutes per model (see mlpipe/monitor.py)."""
from __future__ import annotations

import sys

import click

from mlpipe.errors import MONITOR_EXIT


@click.command()
@click.argument("spec_path", metavar="SPEC.yml")
@click.option("--endpoint", "endpoints", multiple=True, metavar="URL",
              help="A serving host's base URL (repeat for several); default: the spec's monitor.endpoints.")
@click.option("--textfile", default=None, metavar="PATH",
              help="Write the figures in Prometheus text format here ({model} is replaced by the model name); "
                   "default: the spec's monitor.textfile.")
@click.option("--wait", is_flag=True, help="When an alert starts a retrain, run it in the foreground and report its "
                                           "exit code (default: detached, its output appended to a log file).")
@click.option("--db", default=None, metavar="URL", envvar="MLPIPE_CAPTURE_DB",
              help="Capture database (SQLAlchemy URL) [env MLPIPE_CAPTURE_DB; default a SQLite file under "
                   "MLPIPE_FLEET_ROOT or ~/.mlpipe].")
@click.option("--token", envvar="MLPIPE_TOKEN", default=None, help="Bearer token for the endpoints [env MLPIPE_TOKEN].")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each endpoint request.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (log lines go to stderr).")
@click.option("--registry", envvar="MLPIPE_REGISTRY", default=None, metavar="URL",
              help="Registry: a path, file://PATH or s3://bucket/prefix [env MLPIPE_REGISTRY].")
@click.option("--cache", envvar="MLPIPE_CACHE", default=None, metavar="URL", help="Redis cache [env MLPIPE_CACHE].")
def monitor(spec_path, endpoints, textfile, wait, db, token, timeout, as_json, registry, cache):
    """Measure a model's drift, live quality, latency and errors; evaluate the spec's alerts; notify
    (webhook, log line, ledger event); start a retrain for an alert with do: [retrain], bounded by the
    retrain cooldown.

    \b
    Exit codes: 0 healthy, 14 an alert is firing, 2-7 errors (see mlpipe --help).

    \b
    Example:
      mlpipe monitor examples/credit-risk.yml --endpoint http://10.0.0.5:8080
      mlpipe monitor examples/credit-risk.yml --json --textfile /var/lib/node_exporter/mlpipe-{model}.prom
    """
    import json

    from mlpipe import capture, monitor as mon
    from mlpipe import spec as spec_mod
    from mlpipe.cli_retrain import _logger
    from mlpipe.registry import Registry
    log = _logger(as_json)
    spec = spec_mod.load(spec_path)
    reg = Registry(registry, cache)
    reg.require_model(spec.name)
    store = capture.Store(db)
    report = mon.run(spec, reg, store, list(endpoints) or None, textfile=textfile, wait=wait, token=token,
                     timeout=timeout, log=log)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        for line in report["summary"].splitlines():
            log(line)
    code = report.get("exit_code", MONITOR_EXIT["healthy"])
    if code:
        sys.exit(code)
