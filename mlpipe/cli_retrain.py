"""``mlpipe retrain``: the command cron runs (see mlpipe/retrain.py for what it decides and how)."""
from __future__ import annotations

import signal
import sys
from datetime import datetime, timezone

import click

from mlpipe.errors import RETRAIN_EXIT


def _logger(to_stderr: bool):
    stamp = not sys.stdout.isatty()  # cron's log file gets a time on every line; a terminal does not

    def log(line: str) -> None:
        if stamp:
            line = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}Z {line}"
        click.echo(line, err=to_stderr)
        (sys.stderr if to_stderr else sys.stdout).flush()
    return log


def _terminate(signum, frame):  # cron, systemd or a person stopping the run: unwind, release the lock
    raise KeyboardInterrupt(f"signal {signum}")


@click.command()
@click.argument("spec_path", metavar="SPEC.yml")
@click.option("--force", is_flag=True, help="Retrain now: ignore min_new_rows, cooldown and a pause (the lock and the "
                                             "gate still apply).")
@click.option("--dry-run", is_flag=True, help="Decide, train and gate, but register, promote and deploy nothing "
                                               "(no ledger event either).")
@click.option("--break-lock", is_flag=True, help="Take over the retrain lock of a run that died on another host.")
@click.option("--project", default=None, metavar="DIR", envvar="MLPIPE_DEPLOY_PROJECT",
              help="With retrain.deploy: the folder with ansible.cfg and playbooks/deploy.yml [env MLPIPE_DEPLOY_PROJECT].")
@click.option("--inventory", default=None, metavar="PATH", envvar="MLPIPE_DEPLOY_INVENTORY",
              help="With retrain.deploy: the inventory (default: the project's ansible.cfg) [env MLPIPE_DEPLOY_INVENTORY].")
@click.option("--no-notebook", is_flag=True, help="Do not run the spec's notebook after training.")
@click.option("--pause", "pause_", is_flag=True, help="Pause retraining of this model (every run skips) and exit.")
@click.option("--resume", "resume_", is_flag=True, help="Resume retraining of this model and exit.")
@click.option("--reason", default="", help="With --pause / --resume: why (kept in the ledger).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (progress goes to stderr).")
@click.option("--registry", envvar="MLPIPE_REGISTRY", default=None, metavar="URL",
              help="Registry: a path, file://PATH or s3://bucket/prefix [env MLPIPE_REGISTRY].")
@click.option("--cache", envvar="MLPIPE_CACHE", default=None, metavar="URL", help="Redis cache [env MLPIPE_CACHE].")
def retrain(spec_path, force, dry_run, break_lock, project, inventory, no_notebook, pause_, resume_, reason, as_json,
            registry, cache):
    """Retrain a model when there is enough new data; promote (and deploy) the challenger only if it
    beats the champion on the same fresh holdout. What cron runs.

    \b
    Exit codes: 0 skipped (nothing to do), 10 promoted (and deployed), 11 rejected by the gate,
    12 deploy failed (the alias was put back), 13 a notebook failed (the version is kept),
    8 another retrain of the model holds the lock, 3-7 and 9 errors (see mlpipe --help), 130 interrupted.

    \b
    Example:
      mlpipe retrain examples/credit-risk.yml             # what cron runs
      mlpipe retrain examples/credit-risk.yml --force     # retrain now
      mlpipe retrain examples/credit-risk.yml --pause --reason "label pipeline broken, INC-123"
    """
    import json

    from mlpipe import retrain as rt
    from mlpipe import spec as spec_mod
    from mlpipe.errors import UsageError
    from mlpipe.registry import Registry
    log = _logger(as_json)
    spec = spec_mod.load(spec_path)
    reg = Registry(registry, cache)
    if pause_ or resume_:
        if pause_ and resume_:
            raise UsageError("give --pause or --resume, not both")
        if pause_:
            entry = rt.pause(reg, spec.name, reason)
            out = {"model": spec.name, "paused": entry}
            text = f"retrain {spec.name}: paused (every run skips until mlpipe retrain {spec_path} --resume)"
        else:
            was = rt.resume(reg, spec.name, reason)
            out = {"model": spec.name, "resumed": was}
            text = f"retrain {spec.name}: " + ("resumed" if was else "was not paused")
        click.echo(json.dumps(out, indent=2, sort_keys=True, default=str) if as_json else text)
        return
    old = signal.signal(signal.SIGTERM, _terminate)
    run = rt.Run(spec, reg, force=force, dry_run=dry_run, break_lock=break_lock, project=project,
                 inventory=inventory, notebook=not no_notebook, log=log)
    try:
        report = run.run()
    except KeyboardInterrupt:
        if not dry_run and not run.report.get("outcome"):  # an interrupted deploy has recorded its outcome
            rt.failed(reg, spec.name, RuntimeError("interrupted"), log)
        if run.report.get("summary"):
            log(run.report["summary"])
        raise
    except Exception as exc:
        if not dry_run and not isinstance(exc, rt.Locked):
            rt.failed(reg, spec.name, exc, log)
        elif isinstance(exc, rt.Locked) and not dry_run:
            try:
                reg.record(spec.name, "retrain_locked", reason=str(exc))
            except Exception:
                pass
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        log(report["summary"])
    code = RETRAIN_EXIT.get(report["outcome"], 1)
    if code:
        sys.exit(code)
