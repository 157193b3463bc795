"""The ``mlpipe`` command: thin click wrappers over the library; errors become exit codes."""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import click

from mlpipe import __version__
from mlpipe.errors import MlpipeError

EXIT_USAGE = 3


def _common(f):
    """--json, --registry and --cache on every command."""
    f = click.option("--cache", envvar="MLPIPE_CACHE", default=None, metavar="URL",
                     help="Redis cache in front of the registry, e.g. redis://127.0.0.1:6379/0 [env MLPIPE_CACHE].")(f)
    f = click.option("--registry", envvar="MLPIPE_REGISTRY", default=None, metavar="URL",
                     help="Registry: a path, file://PATH or s3://bucket/prefix [env MLPIPE_REGISTRY; default ./.mlpipe/registry].")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(f)
    return f


def _registry(registry, cache):
    from mlpipe.registry import Registry
    return Registry(registry, cache)


def _emit(obj, as_json: bool, text: str | None = None):
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    elif text is not None:
        click.echo(text)


def _date_log(iso: str) -> str:
    d = datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")
    return f"{d:%a %b} {d.day} {d:%H:%M %Y} +0000"


def _metric_label(name: str) -> str:
    return "-".join(p.upper() if len(p) <= 2 else p.capitalize() for p in name.split("_"))


def _params(p: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in p.items())


def _steps(m: dict) -> list[dict]:
    """A Pipeline's steps as the spec gave them ([] for a single estimator)."""
    steps = ((m.get("spec") or {}).get("model") or {}).get("steps") or []
    return [{"estimator": s["estimator"], "params": dict(s.get("params") or {})} for s in steps]


def _show_text(m: dict, aliases: list[str]) -> str:
    models = [f for f in sorted(m["files"]) if f.endswith((".joblib", ".onnx"))]
    lines = [f"Model-ID: {m['id']}", f"Model-Name: {m['name']}", f"Model-Version: {m['version']}",
             f"Date: {m['created'][:19].replace('T', ' ')}",
             f"Content-Encoding: {', '.join(('onnx' if f.endswith('.onnx') else 'joblib') for f in models)}",
             f"Algo: {m['algo']}"]
    lines += [f"{_metric_label(k)}: {v:.4g}" for k, v in m.get("metrics", {}).items()]
    lines.append(f"Parameters: {_params(m.get('params', {}))}")
    steps = _steps(m)
    if steps:
        lines.append("Steps: " + "  ".join(f"{i}. {s['estimator']} ({_params(s['params']).replace(';', '; ')})"
                                           for i, s in enumerate(steps, 1)))
    lines.append(f"Data: {m['data']['source']} ({m['data']['rows']} rows, fingerprint {m['data']['fingerprint'][:12]})")
    holdout = m["data"].get("holdout")
    if holdout:
        sampled = f", sampled from {holdout['sampled_from_rows']}" if holdout.get("sampled_from_rows") else ""
        lines.append(f"Holdout: {holdout['file']} ({holdout['rows']} rows{sampled}, from {holdout['source']})")
    if m.get("notebook"):
        from mlpipe.notebook import describe
        lines.append(f"Notebook: {describe(m['notebook'])}")
    if aliases:
        lines.append(f"Aliases: {', '.join(aliases)}")
    if m.get("message"):
        lines.append(f"Message: {m['message']}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlpipe")
def cli():
    """mlpipe: train scikit-learn models from a YAML spec, keep every version in a registry,
    serve them over REST and roll them out to a fleet.

    \b
    Example:
      mlpipe train examples/credit-risk.yml -m "first model"
      mlpipe models list
    """
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")


@cli.command()
@click.argument("spec_path", metavar="SPEC.yml")
@click.option("-m", "--message", default="", help="Why this version exists (shown by models log).")
@click.option("--data", "data_source", default=None, help="Override the spec's data.source.")
@click.option("--no-onnx", is_flag=True, help="Do not try to compile the model to ONNX.")
@click.option("--no-notebook", is_flag=True, help="Do not run the spec's notebook.")
@_common
def train(spec_path, message, data_source, no_onnx, no_notebook, as_json, registry, cache):
    """Train the model a pipeline spec describes and register it as the next version.

    When the spec names a notebook, it runs (papermill) once the version number is known and its
    executed copy is stored with the version as notebook.ipynb. A failing notebook does not stop
    the registration: the version is kept, the ledger says notebook_failed, and the exit code is 13.

    \b
    Example:
      mlpipe train examples/credit-risk.yml -m "Updated model with August data"
    """
    from mlpipe import notebook
    from mlpipe import spec as spec_mod
    from mlpipe import train as train_mod
    spec = spec_mod.load(spec_path)
    if data_source:
        spec.data["source"] = data_source
    reg = _registry(registry, cache)
    from mlpipe.retrain import keep_rows, load_dataset
    ds, X, y = load_dataset(spec)
    with tempfile.TemporaryDirectory(prefix="mlpipe-train-") as tmp:
        train_mod.train(spec, Path(tmp), message=message, onnx=False if no_onnx else None, dataset=(ds, X, y))
        manifest = reg.register(Path(tmp), prepare=notebook.preparer(spec, Path(tmp), enabled=not no_notebook))
    keep_rows(reg, manifest, ds, X, y, log=lambda line: click.echo(line, err=True))  # what mlpipe retrain compares to
    status = notebook.record_outcome(reg, manifest)
    metrics = " ".join(f"{k}={v:.4f}" for k, v in manifest["metrics"].items())
    text = f"registered {manifest['name']}:{manifest['version']} (id {manifest['id']}) {metrics}"
    if status == "ok":
        text += f"\nnotebook: {notebook.describe(manifest['notebook'])}"
    _emit(manifest, as_json, text)
    if status == "failed":
        click.echo(f"error: {manifest['name']}:{manifest['version']} is registered, but its {manifest['notebook']['error']}",
                   err=True)
        sys.exit(notebook.EXIT_FAILED)


@cli.group()
def models():
    """List, inspect, promote, roll back and pull registered model versions.

    \b
    Example:
      mlpipe models show credit-risk@production
    """


@models.command("list")
@_common
def models_list(as_json, registry, cache):
    """One line per model: latest version and its aliases.

    \b
    Example:
      mlpipe models list --registry s3://ml-models/prod
    """
    reg = _registry(registry, cache)
    rows = []
    for name in reg.models():
        versions = reg.versions(name)
        aliases = reg.aliases(name)
        rows.append({"name": name, "latest": versions[-1], "versions": len(versions), "aliases": aliases})
    width = max([len(r["name"]) for r in rows] + [4])
    text = "\n".join(
        f"{r['name']:<{width}}  v{r['latest']:<4} " + " ".join(a if v == r["latest"] else f"{a}=v{v}" for a, v in r["aliases"].items())
        for r in rows).rstrip() if rows else f"no models in {reg.url}"
    _emit(rows, as_json, "\n".join(line.rstrip() for line in text.splitlines()))


@models.command("log")
@click.argument("name", required=False)
@_common
def models_log(name, as_json, registry, cache):
    """Every version, newest first, with its message (like git log).

    \b
    Example:
      mlpipe models log credit-risk
    """
    from mlpipe.registry import iter_log
    reg = _registry(registry, cache)
    entries = iter_log(reg, [name] if name else None)
    blocks = []
    for m in entries:
        blocks.append(f"Model-ID: {m['id']}\nModel-Name: {m['name']}\nModel-Version: {m['version']}\n"
                      f"Date: {_date_log(m['created'])}\n\n    {m.get('message') or '(no message)'}\n")
    _emit([{k: m.get(k) for k in ("id", "name", "version", "created", "message", "metrics")} for m in entries],
          as_json, "\n".join(blocks).rstrip() if blocks else f"no models in {reg.url}")


@models.command("show")
@click.argument("ref")
@_common
def models_show(ref, as_json, registry, cache):
    """Details of one version: NAME:VERSION, NAME@ALIAS or NAME (latest).

    \b
    Example:
      mlpipe models show credit-risk:4
    """
    reg = _registry(registry, cache)
    name, version = reg.resolve(ref)
    m = reg.manifest(name, version)
    aliases = [a for a, v in reg.aliases(name).items() if v == version]
    _emit({**m, "aliases": aliases, "steps": _steps(m)}, as_json, _show_text(m, aliases))


@models.command("history")
@click.argument("name")
@_common
def models_history(name, as_json, registry, cache):
    """The ledger of a model: registrations, promotions, deploys per host, rollbacks, and why.

    \b
    Example:
      mlpipe models history credit-risk
    """
    reg = _registry(registry, cache)
    reg.require_model(name)
    events = reg.events(name)
    lines = []
    for e in events:
        where = f" on {e['host']}" if e.get("host") else ""
        alias = f" @{e['alias']}" if e.get("alias") else ""
        prev = f" (was v{e['previous']})" if e.get("previous") not in (None, "") else ""
        why = e.get("reason") or e.get("message") or ""
        lines.append(f"{e['at'][:19].replace('T', ' ')}  {e['event']:<16} v{e.get('version', '?')}{alias}{where}{prev}"
                     f"  by {e.get('by', '?')}{('  ' + why) if why else ''}")
    _emit(events, as_json, "\n".join(lines) if lines else f"no events for {name}")


@models.command("promote")
@click.argument("ref")
@click.option("--alias", required=True, help="Alias to point at this version, e.g. production.")
@click.option("--reason", default="", help="Why (kept in the ledger).")
@_common
def models_promote(ref, alias, reason, as_json, registry, cache):
    """Point an alias at a version.

    \b
    Example:
      mlpipe models promote credit-risk:4 --alias production --reason "beats v3 on August holdout"
    """
    from mlpipe.registry import parse_ref
    reg = _registry(registry, cache)
    entry = reg.promote(ref, alias, reason)
    name = parse_ref(ref)[0]
    _emit(entry, as_json, f"{name}@{alias} -> v{entry['version']}")


@models.command("rollback")
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="Alias to move back.")
@click.option("--reason", default="", help="Why (kept in the ledger).")
@_common
def models_rollback(name, alias, reason, as_json, registry, cache):
    """Move an alias back to the version it pointed at before.

    \b
    Example:
      mlpipe models rollback credit-risk --alias production
    """
    reg = _registry(registry, cache)
    entry = reg.rollback(name, alias, reason)
    _emit(entry, as_json, f"{name}@{alias} -> v{entry['version']}")


LEDGER_EVENTS = ("deployed", "deploy_failed", "host_rolled_back", "host_disabled", "note")


@models.command("record")
@click.argument("ref")
@click.option("--event", required=True, type=click.Choice(LEDGER_EVENTS), help="What happened.")
@click.option("--host", default=None, help="The host it happened on.")
@click.option("--reason", default="", help="Why.")
@click.option("--detail", "details", multiple=True, metavar="KEY=VALUE", help="Extra fields (repeatable).")
@_common
def models_record(ref, event, host, reason, details, as_json, registry, cache):
    """Append an event to a model's ledger (what the deploy playbooks use).

    \b
    Example:
      mlpipe models record credit-risk:5 --event deployed --host 127.0.0.11 --reason "canary passed"
    """
    from mlpipe.errors import UsageError
    reg = _registry(registry, cache)
    name, version = reg.resolve(ref)
    extra = {}
    for d in details:
        k, sep, v = d.partition("=")
        if not sep or not k:
            raise UsageError(f"--detail {d!r} is not KEY=VALUE")
        extra[k] = v
    entry = reg.record(name, event, version=version, host=host, reason=reason, **extra)
    _emit(entry, as_json, f"recorded {event} {name}:{version}" + (f" on {host}" if host else ""))


@models.command("pull")
@click.argument("ref")
@click.option("--dest", required=True, type=click.Path(file_okay=False), help="Folder that holds <N>/ version folders.")
@click.option("--activate", is_flag=True, help="Also switch the 'current' symlink to this version (atomically).")
@click.option("--keep", default=3, show_default=True, help="With --activate: version folders to keep.")
@click.option("--set-previous", type=int, default=None, help="With --activate: point 'previous' at this version (rollbacks).")
@click.option("--file", "fname", default=None, metavar="NAME",
              help="Only this file of the version (e.g. notebook.ipynb), verified, written to DEST/NAME.")
@_common
def models_pull(ref, dest, activate, keep, set_previous, fname, as_json, registry, cache):
    """Copy a version, verified by sha256, into DEST/<N>/ (or one of its files into DEST/NAME).

    \b
    Example:
      mlpipe models pull credit-risk@production --dest /srv/models/credit-risk --activate
      mlpipe models pull credit-risk:5 --file notebook.ipynb --dest .
    """
    reg = _registry(registry, cache)
    if fname is not None:
        if activate or set_previous is not None:
            from mlpipe.errors import UsageError
            raise UsageError("--file pulls one file; --activate and --set-previous need the whole version",
                             hint="drop --file to pull the version folder")
        path, manifest = reg.pull_file(ref, fname, dest)
        meta = manifest["files"].get(fname) or {}
        out = {"path": str(path), "name": manifest["name"], "version": manifest["version"], "id": manifest["id"],
               "file": fname, "sha256": meta.get("sha256"), "size": meta.get("size")}
        _emit(out, as_json, f"{manifest['name']}:{manifest['version']} {fname} -> {path}")
        return
    path, manifest, changed = reg.pull(ref, dest)
    out = {"path": str(path), "name": manifest["name"], "version": manifest["version"], "id": manifest["id"], "changed": changed}
    if activate:
        from mlpipe import hostdir
        out["switched"] = hostdir.activate(Path(dest), manifest["version"], keep=keep, set_previous=set_previous)
        out["changed"] = changed or out["switched"]
    else:
        from mlpipe import hostdir
        if hostdir.current(Path(dest)) is None:  # nothing would serve it: say how
            out["note"] = (f"not active: nothing in {dest} is 'current' yet; add --activate to serve it "
                           f"(mlpipe models pull {manifest['name']}:{manifest['version']} --dest {dest} --activate)")
    _emit(out, as_json, f"{manifest['name']}:{manifest['version']} -> {path}" + (" (already there)" if not changed else "")
          + (" [current]" if activate else "") + (f"\n{out['note']}" if out.get("note") else ""))


@cli.command()
@click.argument("ref", required=False)
@click.option("--data", "source", default=None, metavar="SOURCE",
              help="Data to score on: csv:PATH, parquet:PATH, s3://..., sql:... (default: the evaluation data the "
                   "version stores, holdout.parquet, pulled and verified with it; with --endpoint, that of the version "
                   "the server reports, from --registry). On a host: parquet:<model_dir>/<N>/holdout.parquet.")
@click.option("--min", "mins", multiple=True, metavar="METRIC=V", help="Fail when METRIC < V.")
@click.option("--max", "maxs", multiple=True, metavar="METRIC=V", help="Fail when METRIC > V.")
@click.option("--max-regression", "regs", multiple=True, metavar="METRIC=D",
              help="Fail when METRIC is more than D below the baseline (--against, default @production).")
@click.option("--against", default=None, help="Baseline version for --max-regression, e.g. credit-risk@production.")
@click.option("--endpoint", default=None, metavar="URL", help="Check a live server instead of a registered version.")
@click.option("--model", default=None, help="With --endpoint: the model name the server must serve.")
@click.option("--expect-version", type=int, default=None, help="With --endpoint: the version the server must serve.")
@click.option("--max-p99-ms", type=float, default=None, help="With --endpoint: fail when the single-row p99 latency is above this.")
@click.option("--token", envvar="MLPIPE_TOKEN", default=None, help="With --endpoint: bearer token [env MLPIPE_TOKEN].")
@click.option("--require-onnx", is_flag=True, envvar="MLPIPE_REQUIRE_ONNX",
              help="Score versions (offline, and baselines) with their model.onnx via onnxruntime; refuse versions "
                   "without one, never unpickle [env MLPIPE_REQUIRE_ONNX=1].")
@_common
def evaluate(ref, source, mins, maxs, regs, against, endpoint, model, expect_version, max_p99_ms, token, require_onnx,
             as_json, registry, cache):
    """Check a version (or a live server) against thresholds.

    Exit 0 pass, 1 a metric or latency check failed, 2 server unreachable, unhealthy or on another
    version, 3 usage error. With no thresholds, the gate of the version's spec is used (offline).
    Without --data, the version is scored on the evaluation data it stores (versions from before
    that: their test split, recomputed from the training source).

    \b
    Example:
      mlpipe evaluate credit-risk:4 --min accuracy=0.8
      mlpipe evaluate credit-risk:4 --data csv:holdout.csv --min accuracy=0.8
      mlpipe evaluate --endpoint http://127.0.0.11:8000 --model credit-risk --expect-version 5 \\
          --data csv:holdout.csv --min accuracy=0.9 --max-regression accuracy=0.02 --max-p99-ms 50
    """
    from mlpipe import evaluate as ev
    from mlpipe.errors import UsageError

    def _data_label(d: dict) -> str:
        if d.get("holdout"):
            return f"its stored {d['holdout']['file']} ({d['rows']} rows, from {d['holdout']['source']})"
        return f"{d['source']} ({d['rows']} rows)"
    gate = {"min": ev.parse_thresholds(mins, "--min"), "max": ev.parse_thresholds(maxs, "--max"),
            "max_regression": ev.parse_thresholds(regs, "--max-regression")}
    gate = {k: v for k, v in gate.items() if v}
    if endpoint:
        if ref:
            raise UsageError("give either a model reference or --endpoint, not both")
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"--endpoint {endpoint!r} is not an http(s) URL", hint="e.g. http://127.0.0.11:8000")
        if gate and not source and not registry:
            raise UsageError("metric thresholds need --data, or --registry (env MLPIPE_REGISTRY) to score the stored "
                             "holdout of the version the server reports",
                             hint="e.g. --data parquet:/srv/models/credit-risk/5/holdout.parquet")
        reg = _registry(registry, cache) if gate.get("max_regression") or (gate and not source) else None
        if gate.get("max_regression") and not against:
            against = f"{model}@production" if model else None
        if gate.get("max_regression") and not against:
            raise UsageError("--max-regression with --endpoint needs --against REF or --model NAME (then NAME@production)")
        report = ev.endpoint(endpoint, model, expect_version, source, gate, max_p99_ms, reg, against, token,
                             require_onnx=require_onnx)
        lat = report["latency_ms"]
        lines = [f"{report['endpoint']}: {report['model']} v{report['version']} ({report.get('runtime')}) live, ready",
                 f"  latency p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms over {lat['requests']} requests"]
        if report.get("data"):
            lines.append(f"  on {_data_label(report['data'])}")
    else:
        if not ref:
            raise UsageError("evaluate needs a model reference or --endpoint", hint="e.g. mlpipe evaluate credit-risk:4 --data csv:holdout.csv")
        if expect_version is not None or max_p99_ms is not None:
            raise UsageError("--expect-version and --max-p99-ms need --endpoint")
        report = ev.offline(_registry(registry, cache), ref, source, gate or None, against, require_onnx=require_onnx)
        lines = [f"{report['model']}:{report['version']} ({report['runtime']}) on {_data_label(report['data'])}"]
    lines += [f"  {k} = {v:.4f}" for k, v in (report.get("metrics") or {}).items()]
    lines += [f"  FAIL {x}" for x in ev.describe_failures(report)]
    lines.append("PASS" if report["passed"] else "FAIL")
    _emit(report, as_json, "\n".join(lines))
    if not report["passed"]:
        sys.exit(1)


@cli.command()
@click.option("--model-dir", envvar="MLPIPE_MODEL_DIR", default=None, type=click.Path(file_okay=False),
              help="Folder with pulled versions and a 'current' symlink [env MLPIPE_MODEL_DIR].")
@click.option("--models-dir", envvar="MLPIPE_MODELS_DIR", default=None, type=click.Path(file_okay=False),
              help="Serve every model folder under this one, by name (/models/<name>/invocations, "
                   "/v2/models/<name>/infer); folders added or removed later are picked up [env MLPIPE_MODELS_DIR].")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=None, type=int, help="gunicorn workers [env MLPIPE_WORKERS; default 2].")
@click.option("--token", "tokens", multiple=True, help="Accept this bearer token (repeat for several).")
@click.option("--require-onnx", is_flag=True, default=None, help="Refuse versions without model.onnx (never unpickle).")
@click.option("--pidfile", default=None, type=click.Path(dir_okay=False), help="Write the gunicorn master pid here.")
@click.option("--capture-sample", default=None, type=click.FloatRange(0, 1), metavar="SHARE",
              help="Share of predictions recorded in the capture database (0 off, 1 all) [env MLPIPE_CAPTURE_SAMPLE; "
                   "default: the served version's spec capture.sample, else 0.1].")
@click.option("--capture-db", default=None, metavar="URL",
              help="Capture database, a SQLAlchemy URL [env MLPIPE_CAPTURE_DB; default a SQLite file under "
                   "MLPIPE_FLEET_ROOT or ~/.mlpipe].")
def serve(model_dir, models_dir, host, port, workers, tokens, require_onnx, pidfile, capture_sample, capture_db):
    """Serve a model folder (or a folder of model folders) over REST with gunicorn (the same server as
    in production). A switch of a folder's 'current' link is served within a second, without a reload.

    \b
    Example:
      mlpipe models pull credit-risk@production --dest /srv/models/credit-risk --activate
      mlpipe serve --model-dir /srv/models/credit-risk --port 8000
      mlpipe serve --models-dir /srv/models --port 8000      # every model under /srv/models
    """
    import os
    import shutil
    from mlpipe.serve import load_config
    env = os.environ
    if bool(model_dir) == bool(models_dir):
        from mlpipe.errors import UsageError
        raise UsageError("give --model-dir (one model's folder) or --models-dir (a folder of model folders)",
                         hint="e.g. mlpipe serve --model-dir /srv/models/credit-risk")
    for key, value in (("MLPIPE_MODEL_DIR", model_dir), ("MLPIPE_MODELS_DIR", models_dir)):
        env.pop(key, None)
        if value:
            env[key] = str(Path(value).resolve())
    env["MLPIPE_BIND"] = f"{host}:{port}"
    if workers is not None:
        env["MLPIPE_WORKERS"] = str(workers)
    if tokens:
        env["MLPIPE_AUTH_TOKENS"] = ",".join(tokens)
    if require_onnx:
        env["MLPIPE_REQUIRE_ONNX"] = "1"
    if capture_sample is not None:
        env["MLPIPE_CAPTURE_SAMPLE"] = str(capture_sample)
    if capture_db:
        env["MLPIPE_CAPTURE_DB"] = capture_db
    load_config()  # fail here, with our message, rather than inside gunicorn
    gunicorn = shutil.which("gunicorn", path=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if not gunicorn:
        from mlpipe.errors import UsageError
        raise UsageError("gunicorn is not installed", hint="pip install gunicorn")
    args = [gunicorn, "-c", "python:mlpipe.gunicorn_conf"] + (["-p", pidfile] if pidfile else []) + ["mlpipe.serve:create_app()"]
    os.execv(gunicorn, args)


@cli.command()
@click.option("--pidfile", required=True, type=click.Path(exists=True, dir_okay=False), help="The gunicorn master's pidfile.")
def reload(pidfile):
    """Tell a running server to switch to the version 'current' points at, with no failed request.

    New workers verify, load and warm the new version while the old ones finish their requests.

    \b
    Example:
      mlpipe reload --pidfile /run/mlpipe/credit-risk.pid
    """
    import os
    import signal
    from mlpipe.errors import NotReady
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (ValueError, ProcessLookupError):
        raise NotReady(f"no server is running with the pid in {pidfile}", hint="start it with mlpipe serve --pidfile") from None
    click.echo(f"reload signalled to {pid}")


from mlpipe.cli_fleet import fleet  # noqa: E402  (registers on the group above)

cli.add_command(fleet)

from mlpipe.cli_retrain import retrain  # noqa: E402

cli.add_command(retrain)

from mlpipe.cli_capture import feedback, predictions  # noqa: E402

cli.add_command(predictions)
cli.add_command(feedback)

from mlpipe.cli_monitor import monitor  # noqa: E402

cli.add_command(monitor)


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="mlpipe", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        exc.show()
        sys.exit(EXIT_USAGE)
    except MlpipeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
