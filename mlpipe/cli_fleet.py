"""``mlpipe fleet``: the steps the deploy and rollback playbooks take, one command each (logic in
mlpipe.fleet). Every command prints JSON; errors are one line on stderr with an exit code."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from mlpipe.cli import _common, _registry


def _out(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _service_options(f):
    f = click.option("--supervisor-conf", default=None, help="supervisord's config file (supervisord mode).")(f)
    f = click.option("--supervisor", type=click.Choice(["systemd", "supervisord"]), default="systemd", show_default=True)(f)
    f = click.option("--service", default=None, help="The model server's program/unit name, e.g. mlpipe-credit-risk.")(f)
    f = click.option("--url", default=None, help="The host's own server URL, e.g. http://127.0.0.11:8000.")(f)
    f = click.option("--host", "host_name", default="", help="Inventory name of this host (for messages).")(f)
    return f


def _service(service, supervisor, supervisor_conf):
    from mlpipe.fleet import Service
    return Service(service, supervisor, supervisor_conf) if service else None


@click.group()
def fleet():
    """What the deploy and rollback playbooks run: the lock, the fleet's state from the ledger, a
    host's switch, HAProxy's view. Useful by hand when a deploy was interrupted.

    \b
    Example:
      mlpipe fleet state credit-risk
      mlpipe fleet unlock credit-risk --run 5f2c... --registry s3://ml-models/prod
    """


@fleet.command("lock")
@click.argument("model")
@click.option("--op", type=click.Choice(["deploy", "rollback"]), required=True)
@click.option("--run", "run_id", required=True, help="An id of this run (the playbook makes one).")
@click.option("--target", default=None, help="The version this run moves to (shown to anyone refused).")
@click.option("--break-lock", is_flag=True, help="Take over a lock left by a run that died.")
@_common
def fleet_lock(model, op, run_id, target, break_lock, as_json, registry, cache):
    """Take the model's deploy lock (exit 8 when another run holds it, naming who and since when).

    \b
    Example:
      mlpipe fleet lock credit-risk --op deploy --run r1 --target 5
    """
    from mlpipe.fleet import acquire
    _out(acquire(_registry(registry, cache), model, op, run_id, target, break_lock))


@fleet.command("unlock")
@click.argument("model")
@click.option("--run", "run_id", required=True, help="The run that holds the lock.")
@_common
def fleet_unlock(model, run_id, as_json, registry, cache):
    """Release the model's deploy lock if RUN holds it.

    \b
    Example:
      mlpipe fleet unlock credit-risk --run r1
    """
    from mlpipe.fleet import release
    _out({"released": release(_registry(registry, cache), model, run_id)})


@fleet.command("state")
@click.argument("model")
@_common
def fleet_state_cmd(model, as_json, registry, cache):
    """The version live fleet-wide, the one before, each host's last deploy event and the lock.

    \b
    Example:
      mlpipe fleet state credit-risk
    """
    from mlpipe.fleet import fleet_state
    _out(fleet_state(_registry(registry, cache), model))


@fleet.command("rollback-target")
@click.argument("model")
@click.option("--version", type=int, default=None, help="Pin the version instead of asking the ledger.")
@_common
def fleet_rollback_target(model, version, as_json, registry, cache):
    """The one version rollback.yml brings every host to, and why.

    \b
    Example:
      mlpipe fleet rollback-target credit-risk
    """
    from mlpipe.fleet import rollback_target
    _out(rollback_target(_registry(registry, cache), model, version))


@fleet.command("record")
@click.argument("model")
@click.option("--event", type=click.Choice(["fleet_deployed", "fleet_rolled_back"]), required=True)
@click.option("--version", type=int, required=True)
@click.option("--reason", default="")
@_common
def fleet_record(model, event, version, reason, as_json, registry, cache):
    """Record that every host now serves VERSION (nothing when the ledger already says so).

    \b
    Example:
      mlpipe fleet record credit-risk --event fleet_deployed --version 5
    """
    from mlpipe.fleet import record_fleet
    entry = record_fleet(_registry(registry, cache), model, event, version, reason)
    _out({"recorded": entry is not None, "entry": entry})


@fleet.command("status")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="The host's model folder.")
@click.option("--model", required=True)
@_service_options
def fleet_status(directory, model, service, supervisor, supervisor_conf, url, host_name):
    """This host's versions, an unfinished switch, whether its server runs and what it answers
    (bearer token from env MLPIPE_TOKEN).

    \b
    Example:
      mlpipe fleet status --dir /srv/mlpipe/models/credit-risk --model credit-risk --service mlpipe-credit-risk
    """
    from mlpipe.fleet import host_status
    _out(host_status(Path(directory), model, _service(service, supervisor, supervisor_conf), url,
                     os.environ.get("MLPIPE_TOKEN") or None, host_name))


@fleet.command("activate")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="The host's model folder.")
@click.option("--model", required=True)
@click.option("--version", type=int, required=True)
@click.option("--registry", default=None, help="Pull from here when the host has no verified copy (else refuse).")
@click.option("--cache", default=None, help="Redis cache in front of the registry.")
@click.option("--keep", default=3, show_default=True, help="Version folders to keep.")
@click.option("--set-previous", type=int, default=None, help="Point 'previous' at this version (a rollback restores it).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the server to answer with VERSION.")
@click.option("--deploy-run", default=None, help="Record the switch in DIR/.deploy.json first (deploys).")
@_service_options
def fleet_activate(directory, model, version, registry, cache, keep, set_previous, timeout, deploy_run,
                   service, supervisor, supervisor_conf, url, host_name):
    """Put VERSION on this host (its own verified copy first, no registry call), switch, reload, wait.

    \b
    Example:
      mlpipe fleet activate --dir /srv/mlpipe/models/credit-risk --model credit-risk --version 4 \\
          --service mlpipe-credit-risk --url http://127.0.0.11:8000
    """
    from mlpipe.fleet import activate
    from mlpipe.registry import Registry
    reg = Registry(registry, cache) if registry else None
    _out(activate(Path(directory), model, version, registry=reg, keep=keep, set_previous=set_previous,
                  service=_service(service, supervisor, supervisor_conf), url=url,
                  token=os.environ.get("MLPIPE_TOKEN") or None, timeout=timeout, deploy_run=deploy_run, host=host_name))


@fleet.command("deactivate")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@_service_options
def fleet_deactivate(directory, service, supervisor, supervisor_conf, url, host_name):
    """Take every version off this host (a failed first deploy has nothing to go back to).

    \b
    Example:
      mlpipe fleet deactivate --dir /srv/mlpipe/models/credit-risk --service mlpipe-credit-risk
    """
    from mlpipe.fleet import deactivate
    _out(deactivate(Path(directory), _service(service, supervisor, supervisor_conf)))


@fleet.command("finish")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
def fleet_finish(directory):
    """Forget an unfinished switch's record (the deploy finished or was rolled back).

    \b
    Example:
      mlpipe fleet finish --dir /srv/mlpipe/models/credit-risk
    """
    from mlpipe.fleet import finish
    _out({"changed": finish(Path(directory))})


@fleet.command("lb-status")
@click.option("--socket", "sock", required=True, help="HAProxy's admin socket.")
@click.option("--backend", required=True)
@click.option("--server", default=None, help="Also say whether this server may be drained.")
@click.option("--missing-ok", is_flag=True, help="Print null instead of failing when the socket does not exist (no balancer yet).")
def fleet_lb_status(sock, backend, server, missing_ok):
    """HAProxy's view of a backend; with --server, whether draining it leaves another server up.

    \b
    Example:
      mlpipe fleet lb-status --socket /srv/mlpipe/run/haproxy.sock --backend mlpipe --server ms1
    """
    from mlpipe.fleet import lb_status, may_drain
    st = lb_status(sock, backend, missing_ok=missing_ok)
    if st is None:
        _out(None)
        return
    if server:
        st["server"] = server
        st["may_drain"] = may_drain(st, server)
    _out(st)


@fleet.command("lb-weights")
@click.option("--socket", "sock", required=True, help="HAProxy's admin socket.")
@click.option("--backend", "backends", required=True, multiple=True,
              help="The backend (repeat for several: a model's own and the one of the unnamed routes).")
@click.option("--canary", "canaries", multiple=True, metavar="SERVER", help="A canary server (repeat for several).")
@click.option("--share", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=None,
              help="Percent of the backend's traffic the canaries get together.")
@click.option("--reset", is_flag=True, help="Give every server its configured weight back.")
def fleet_lb_weights(sock, backends, canaries, share, reset):
    """Set HAProxy runtime weights so the canary gets SHARE percent of the live traffic (the other
    servers that are up keep their proportions), or --reset them to the configured weights (what an
    interrupted bake leaves behind; every deploy and rollback starts with a reset).

    \b
    Example:
      mlpipe fleet lb-weights --socket /srv/mlpipe/run/haproxy.sock --backend mlpipe --canary ms1 --share 10
      mlpipe fleet lb-weights --socket /srv/mlpipe/run/haproxy.sock --backend mlpipe --reset
    """
    from mlpipe.canary import reset_weights, set_canary_weights
    from mlpipe.errors import UsageError
    if reset == bool(canaries or share is not None):
        raise UsageError("give either --canary SERVER --share PERCENT, or --reset")
    if not reset and (not canaries or share is None):
        raise UsageError("--canary and --share go together")
    results = {b: reset_weights(sock, b) if reset else set_canary_weights(sock, b, list(canaries), share) for b in backends}
    first = results[backends[0]]
    _out({**first, "changed": any(r["changed"] for r in results.values()), "backends": results})


@fleet.command("bake")
@click.option("--canary", "canaries", multiple=True, required=True, metavar="[NAME=]URL",
              help="The canary's server URL (repeat for several canaries).")
@click.option("--baseline", "baselines", multiple=True, metavar="[NAME=]URL",
              help="A server still on the old version (repeat). None: the canary is judged alone.")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), required=True, help="How long to bake.")
@click.option("--interval", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds between scrapes (the bake stops early on an error-rate breach).")
@click.option("--model", default=None, help="Only count series of this model (servers that label them by model).")
@click.option("--expect-version", default=None, help="The version the canary must serve all along.")
@click.option("--max-error-rate-delta", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Largest allowed difference canary - old of the 5xx share (and of the 4xx share).")
@click.option("--max-p99-ratio", type=click.FloatRange(1), default=1.5, show_default=True,
              help="The canary's p99 may be at most old p99 x this + --p99-slack-ms.")
@click.option("--p99-slack-ms", type=click.FloatRange(0), default=10.0, show_default=True)
@click.option("--max-prediction-shift", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Largest total variation distance between the two sides' prediction distributions.")
@click.option("--min-requests", type=click.IntRange(1), default=50, show_default=True,
              help="Fewer prediction requests than this on a side: not enough traffic to judge it.")
@click.option("--quiet", type=click.Choice(["pass", "fail"]), default="pass", show_default=True,
              help="The verdict when the canary had too little traffic to judge.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds per /metrics request.")
@click.option("--progress", is_flag=True, help="A line on stderr at every scrape.")
def fleet_bake(canaries, baselines, seconds, interval, model, expect_version, max_error_rate_delta, max_p99_ratio,
               p99_slack_ms, max_prediction_shift, min_requests, quiet, timeout, progress):
    """Watch a canary on live traffic for SECONDS and compare its error rate, p99 latency and
    prediction distribution (from each host's /metrics) with the hosts still on the old version.
    Prints both sides' figures and the verdict as JSON; exit 1 on a breach (the reason on stderr).
    Bearer token from env MLPIPE_TOKEN.

    \b
    Example:
      mlpipe fleet bake --canary ms1=http://10.0.1.11:8000 --baseline ms2=http://10.0.1.12:8000 \\
          --baseline ms3=http://10.0.1.13:8000 --seconds 300 --expect-version 5
    """
    from mlpipe.canary import bake, describe, message
    from mlpipe.errors import GateFailed
    limits = {"max_error_rate_delta": max_error_rate_delta, "max_p99_ratio": max_p99_ratio, "p99_slack_ms": p99_slack_ms,
              "max_prediction_shift": max_prediction_shift, "min_requests": min_requests, "quiet": quiet}
    report = bake(list(canaries), list(baselines), seconds, token=os.environ.get("MLPIPE_TOKEN") or None, model=model,
                  expect_version=expect_version, limits=limits, interval=interval, timeout=timeout,
                  log=(lambda m: click.echo(m, err=True)) if progress else None)
    report["message"], report["figures"] = message(report), describe(report)
    _out(report)
    if not report["passed"]:
        raise GateFailed(report["message"])
