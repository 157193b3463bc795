"""``mlpipe retrain``: what cron runs. Retrain a model only when there is enough new data, gate the
challenger against the champion on the same fresh holdout, promote it, and deploy it.

    pause       <registry>/<model>/retrain/PAUSED (``mlpipe retrain SPEC --pause``): every run skips
    lock        <registry>/<model>/retrain/LOCK, an exclusive write: one retrain per model at a time
                across every trainer; a lock left by a dead process on this host is taken over
    cooldown    the last run that trained (a ``retrain_*`` ledger event with trained=true) must be
                older than ``retrain.cooldown``
    new data    the source's rows are hashed (``data.row_hashes``) and compared with the rows the
                champion (the ``retrain.promote`` alias) was trained on, kept at
                <registry>/<model>/datasets/<version>.npz; fewer than ``retrain.min_new_rows`` new
                rows: skip. Data unchanged since a challenger that was rejected: skip.
    challenger  trained on all the current data, exactly as ``mlpipe train`` does
    holdout     the challenger's test split minus every row the champion trained on (so neither model
                has seen it), or the spec's ``data.holdout``; both models are scored on it
    gate        the spec's ``gate``: absolute ``min``/``max`` and ``max_regression`` against the champion
    register    always, with a message saying what data it saw and the verdict with both scores
    promote     when the gate passes (and the alias still points at the champion it was compared to)
    deploy      ``retrain.deploy: true``: playbooks/deploy.yml through the ansible-runner Python API;
                a failed deploy puts the alias back

Every outcome is a ledger event (retrain_skipped, retrain_promoted, retrain_rejected,
retrain_deploy_failed, retrain_failed, retrain_locked) and an exit code (errors.RETRAIN_EXIT).
"""
from __future__ import annotations

import io
import json
import os
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from mlpipe import artifact, data, train as train_mod
from mlpipe.errors import RETRAIN_EXIT, Conflict, DataError, Locked, MlpipeError, NotFound, UsageError
from mlpipe.spec import Spec, parse_duration

MIN_FRESH_ROWS = 30          # a fresh holdout smaller than this falls back to the whole test split
TRAINED_EVENTS = ("retrain_promoted", "retrain_rejected", "retrain_deploy_failed")
DEPLOY_TIMEOUT_ENV = "MLPIPE_DEPLOY_TIMEOUT"
PROJECT_ENV = "MLPIPE_DEPLOY_PROJECT"
INVENTORY_ENV = "MLPIPE_DEPLOY_INVENTORY"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parse_at(at: str) -> datetime:
    return datetime.strptime(at[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)


def _ago(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"


# ---------------------------------------------------------------------------------- pause and lock
def _key(name: str, what: str) -> str:
    from mlpipe.registry import check_name
    return f"{check_name(name)}/retrain/{what}"


def paused(reg, name: str) -> dict | None:
    try:
        return reg.store.get_json(_key(name, "PAUSED"))
    except KeyError:
        return None


def pause(reg, name: str, reason: str = "") -> dict:
    from mlpipe.registry import whoami
    entry = {"by": whoami(), "since": artifact.utcnow(), "reason": reason}
    reg.store.put(_key(name, "PAUSED"), json.dumps(entry, sort_keys=True).encode())
    reg.record(name, "retrain_paused", reason=reason)
    return entry


def resume(reg, name: str, reason: str = "") -> bool:
    if paused(reg, name) is None:
        return False
    reg.store.delete(_key(name, "PAUSED"))
    reg.record(name, "retrain_resumed", reason=reason)
    return True


def _started(pid) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22) with the boot id."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, ValueError, IndexError, TypeError):
        return None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # another user's live process (or unreadable): assume alive
    return True


def acquire(reg, name: str, run: str, break_lock: bool = False) -> dict | None:
    """Take the model's retrain lock. Returns the lock it replaced (a dead run's), if any."""
    from mlpipe.registry import whoami
    entry = {"run": run, "by": whoami(), "host": socket.gethostname(), "pid": os.getpid(), "since": artifact.utcnow(),
             "started": _started(os.getpid())}
    body = json.dumps(entry, sort_keys=True).encode()
    try:
        reg.store.put(_key(name, "LOCK"), body, exclusive=True)
        return None
    except Conflict:
        try:
            held = reg.store.get_json(_key(name, "LOCK"))
        except KeyError:  # released in between: try once more
            held = {}
    here = held.get("host") == socket.gethostname()
    dead = here and (not _pid_alive(held.get("pid")) or (
        held.get("started") is not None and _started(held.get("pid")) != held.get("started")))
    if here and not dead and held:
        raise Locked(f"retrain of {name} is running on this host (pid {held.get('pid')}, by {held.get('by', '?')}, since "
                     f"{str(held.get('since', '?'))[:19].replace('T', ' ')} UTC)",
                     hint="wait for it to finish; --break-lock only takes over a run that died on another host")
    if held and not (dead or break_lock):
        raise Locked(f"retrain of {name} is locked by {held.get('by', '?')} (pid {held.get('pid', '?')} on "
                     f"{held.get('host', '?')}) since {str(held.get('since', '?'))[:19].replace('T', ' ')} UTC",
                     hint="another retrain of this model is running; if it died on another host, run again with "
                          "--break-lock")
    if held:
        reg.store.delete(_key(name, "LOCK"))
    try:
        reg.store.put(_key(name, "LOCK"), body, exclusive=True)
    except Conflict:
        raise Locked(f"retrain of {name}: another run took the lock at the same moment",
                     hint="it is running now; nothing to do") from None
    if held:
        why = "its process is gone" if dead else "--break-lock"
        reg.record(name, "lock_broken", reason=f"took over the retrain lock of pid {held.get('pid')} on "
                                               f"{held.get('host')} ({why})", held_by=held.get("by"),
                   held_since=held.get("since"), run=run)
    return held or None


def release(reg, name: str, run: str) -> None:
    try:
        held = reg.store.get_json(_key(name, "LOCK"))
    except KeyError:
        return
    if held.get("run") == run:
        reg.store.delete(_key(name, "LOCK"))


# --------------------------------------------------------------------------------------- cooldown
def cooldown(reg, name: str, cooldown: str | int) -> str | None:
    """Why a retrain of ``name`` must wait (the last run that trained is younger than ``cooldown``), or
    None when it may run. Shared by ``mlpipe retrain`` and ``mlpipe monitor`` (which starts
    ``retrain --force``, where the cooldown no longer applies, so it asks first)."""
    seconds = parse_duration(cooldown, "retrain.cooldown")
    if not seconds:
        return None
    try:
        events = reg.events(name)
    except Exception:
        return None
    last = next((e for e in reversed(events) if e.get("event") in TRAINED_EVENTS and e.get("trained")), None)
    if last is None:
        return None
    age = (_now() - _parse_at(last["at"])).total_seconds()
    if age >= seconds:
        return None
    return (f"cooldown — last retrain {_ago(age)} ago (v{last.get('version', '?')}, "
            f"{last['event'].removeprefix('retrain_').replace('_', ' ')}), needs {_ago(seconds)} (cooldown)")


# ------------------------------------------------------------------------------------------- rows
def _rows_key(name: str, version: int) -> str:
    return f"{name}/datasets/{int(version)}.npz"


def save_rows(reg, name: str, version: int, seen, trained) -> None:
    """Keep the hashes of the rows a version saw and trained on (what the next retrain compares to)."""
    buf = io.BytesIO()
    np.savez(buf, seen=np.unique(seen), train=np.unique(trained))
    reg.store.put(_rows_key(name, version), buf.getvalue())


def load_rows(reg, name: str, version: int) -> dict | None:
    try:
        raw = reg.store.get(_rows_key(name, version))
    except KeyError:
        return None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {"seen": z["seen"], "train": z["train"]}
    except Exception:  # unreadable: count new rows from row counts, as for versions from before row hashes
        return None


def model_rows(X, y):
    """One hash per row over the columns the model uses (features + target, in name order)."""
    import pandas as pd
    frame = pd.concat([X, y], axis=1)
    return data.row_hashes(frame[sorted(frame.columns, key=str)])


def load_dataset(spec: Spec):
    """The spec's data with a fresh 0..n-1 index (row positions = index labels), X and y."""
    ds = data.load(spec.data["source"])
    ds.frame = ds.frame.reset_index(drop=True)
    X, y = data.split_xy(ds, spec.data["target"], spec.data.get("features"))
    return ds, X, y


def keep_rows(reg, manifest: dict, ds, X, y, hashes=None, log: Callable[[str], None] = print) -> None:
    """Save the row hashes a registered version saw and trained on; a failure only warns (the next
    retrain then counts new rows from row counts)."""
    name, n = manifest["name"], manifest["version"]
    try:
        hashes = model_rows(X, y) if hashes is None else hashes
        X_train = train_mod.split_with(manifest["split"], X, y, ds.source)[0]
        save_rows(reg, name, n, hashes, hashes[X_train.index.to_numpy()])
    except Exception as exc:
        log(f"warning: could not keep the row hashes of {name}:{n} (the next retrain counts new rows from row "
            f"counts): {exc}")


# ------------------------------------------------------------------------------------------ deploy
def deploy(name: str, version: int, project: str | None, inventory: str | None, log: Callable[[str], None],
           timeout: float | None = None, extravars: dict | None = None,
           cancelled: Callable[[], bool] | None = None) -> dict:
    """Run playbooks/deploy.yml of ``project`` through ansible-runner; every event's output goes to ``log``."""
    try:
        import ansible_runner
    except ImportError:
        raise UsageError("retrain.deploy needs ansible-runner, which is not installed",
                         hint="pip install 'mlpipe[fleet]'") from None
    project = project or os.environ.get(PROJECT_ENV)
    if not project:
        raise UsageError("retrain.deploy is true but no deploy project is set",
                         hint=f"pass --project DIR or set {PROJECT_ENV} to the folder with ansible.cfg and "
                              "playbooks/deploy.yml (the retrain_cron role sets it)")
    project = str(Path(project).resolve())
    if not (Path(project) / "playbooks" / "deploy.yml").is_file():
        raise UsageError(f"deploy project {project} has no playbooks/deploy.yml",
                         hint=f"point --project / {PROJECT_ENV} at a checkout of the mlpipe project")
    inventory = inventory or os.environ.get(INVENTORY_ENV) or None
    timeout = timeout or float(os.environ.get(DEPLOY_TIMEOUT_ENV) or 3600)
    bindir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "PYTHONUNBUFFERED": "1"}
    # Ansible expands its default ~/.ansible/tmp with the user's passwd home, which for a service user
    # such as mlpipe is /nonexistent; $HOME (cron's, the retrain_cron role's) is what the job has
    env["ANSIBLE_REMOTE_TMP"] = os.environ.get("ANSIBLE_REMOTE_TMP") or "$HOME/.ansible/tmp"
    if (Path(project) / "ansible.cfg").is_file():
        env["ANSIBLE_CONFIG"] = str(Path(project) / "ansible.cfg")

    def on_event(event: dict) -> bool:
        for line in (event.get("stdout") or "").splitlines():
            if line.strip():
                log(f"  | {line}")
        return True

    with tempfile.TemporaryDirectory(prefix="mlpipe-deploy-") as pdd:
        kwargs = dict(private_data_dir=pdd, project_dir=project, playbook="playbooks/deploy.yml",
                      extravars={"model": name, "version": int(version), **(extravars or {})}, envvars=env,
                      event_handler=on_event, quiet=True, timeout=int(timeout),
                      cancel_callback=cancelled or (lambda: False))
        if inventory:
            kwargs["inventory"] = str(Path(inventory).resolve()) if Path(inventory).exists() else inventory
        t0 = time.perf_counter()
        runner = ansible_runner.run(**kwargs)
        stats = runner.stats or {}
    failed_hosts = sorted(set(stats.get("failures", {})) | set(stats.get("dark", {})))
    return {"status": runner.status, "rc": runner.rc, "seconds": round(time.perf_counter() - t0, 1),
            "failed_hosts": failed_hosts, "hosts": sorted(set().union(*[set(v) for v in stats.values()])) if stats else []}


def _defer_signals(stop: list) -> dict:
    """SIGTERM/SIGINT only append to ``stop`` (main thread only); returns what to restore."""
    import signal
    import threading
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    return handlers


def _restore_signals(handlers: dict) -> None:
    import signal
    for sig, old in handlers.items():
        signal.signal(sig, old)


# ------------------------------------------------------------------------------------------ retrain
class Run:
    """One retrain of one model. ``run()`` returns the report; every outcome is in the ledger."""

    def __init__(self, spec: Spec, reg, *, force: bool = False, dry_run: bool = False, break_lock: bool = False,
                 project: str | None = None, inventory: str | None = None, notebook: bool = True,
                 log: Callable[[str], None] = print):
        self.spec, self.reg, self.force, self.dry_run = spec, reg, force, dry_run
        self.break_lock, self.project, self.inventory, self.notebook, self.log = (
            break_lock, project, inventory, notebook, log)
        self.name = spec.name
        self.alias = spec.retrain["promote"]
        self.run_id = f"retrain-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.report: dict = {"model": self.name, "alias": self.alias, "dry_run": dry_run, "force": force}

    # -- outcome helpers
    def _finish(self, outcome: str, line: str, event: str | None = None, **fields) -> dict:
        self.report.update(outcome=outcome, exit_code=RETRAIN_EXIT.get(outcome, 1), summary=line, **fields)
        if event and not self.dry_run:
            ledger = {k: v for k, v in self.report.items() if k in (
                "version", "champion", "new_rows", "rows", "fingerprint", "metrics", "champion_metrics",
                "holdout", "checks", "deploy", "notebook", "trained", "alias", "verdict", "stale_champion")}
            ledger.setdefault("version", self.report.get("champion"))  # a skip is about the champion
            try:
                self.reg.record(self.name, event, reason=line, **ledger)
            except Exception as exc:  # the outcome stands; say the ledger missed it
                self.report["ledger_error"] = str(exc)
                self.log(f"warning: could not write the {event} ledger event: {exc}")
        return self.report

    def _champion(self) -> tuple[int | None, dict | None]:
        a = self.reg.alias(self.name, self.alias)
        if a is None:
            return None, None
        v = int(a["version"])
        return v, self.reg.manifest(self.name, v)

    def _cooldown(self) -> str | None:
        if self.force:
            return None
        return cooldown(self.reg, self.name, self.spec.retrain["cooldown"])

    # -- the run
    def run(self) -> dict:
        name = self.name
        if not self.force:
            p = paused(self.reg, name)
            if p is not None:
                why = f": {p['reason']}" if p.get("reason") else ""
                return self._finish("skipped", f"retrain {name}: skipped — paused by {p.get('by', '?')} since "
                                    f"{str(p.get('since', '?'))[:16].replace('T', ' ')} UTC{why} (resume with "
                                    f"mlpipe retrain SPEC --resume)", "retrain_skipped", paused=p)
        root = getattr(self.reg.store, "root", None)
        if root is not None and not Path(root).is_dir() and not self.force:
            # cron on an unmounted disk or a mistyped MLPIPE_REGISTRY must not start a new history
            from mlpipe.errors import RegistryError
            raise RegistryError(f"registry {self.reg.url} does not exist (a disk not mounted, or a wrong "
                                "MLPIPE_REGISTRY?)", hint="fix the path, or create the registry with the first "
                                                          "version: mlpipe retrain SPEC --force")
        if self.dry_run:
            return self._decide_and_train()
        acquire(self.reg, name, self.run_id, self.break_lock)
        try:
            return self._decide_and_train()
        finally:
            try:
                release(self.reg, name, self.run_id)
            except Exception as exc:
                self.log(f"warning: could not release the retrain lock of {name}: {exc}")

    def _decide_and_train(self) -> dict:
        name, spec, reg = self.name, self.spec, self.reg
        why = self._cooldown()
        if why:
            return self._finish("skipped", f"retrain {name}: skipped — {why}", "retrain_skipped")
        ds, X, y = load_dataset(spec)
        fp = data.fingerprint(ds.frame)
        hashes = model_rows(X, y)
        self.report.update(rows=int(len(ds.frame)), fingerprint=fp, source=ds.source)
        champ_v, champ = self._champion()
        champ_rows = load_rows(reg, name, champ_v) if champ_v is not None else None
        self.report["champion"] = champ_v
        new_rows, basis = self._new_rows(hashes, fp, champ_v, champ, champ_rows)
        self.report["new_rows"] = new_rows
        need = int(spec.retrain["min_new_rows"])
        if not self.force:
            since = f"since v{champ_v}" if champ_v is not None else "(no champion yet)"
            if champ is not None and champ["data"].get("fingerprint") == fp:
                return self._finish("skipped", f"retrain {name}: skipped — no new data since v{champ_v} "
                                    f"(fingerprint {fp[:12]} unchanged)", "retrain_skipped")
            if new_rows < need:
                return self._finish("skipped", f"retrain {name}: skipped — {new_rows} new rows {since}, needs {need} "
                                    f"(min_new_rows){basis}", "retrain_skipped")
            tried = self._last_rejected_on(fp, champ_v)
            if tried is not None:
                return self._finish("skipped", f"retrain {name}: skipped — the data has not changed since challenger "
                                    f"v{tried['version']} was {tried['why']} (retrain --force "
                                    f"to try again)", "retrain_skipped")
        return self._challenge(ds, X, y, hashes, champ_v, champ, champ_rows, basis)

    def _new_rows(self, hashes, fp, champ_v, champ, champ_rows) -> tuple[int, str]:
        if champ is None:
            return int(len(hashes)), ""
        if champ_rows is not None:
            return int(np.count_nonzero(~np.isin(hashes, champ_rows["seen"]))), ""
        if champ["data"].get("fingerprint") == fp:
            return 0, ""
        grown = int(len(hashes)) - int(champ["data"].get("rows") or 0)
        # without the champion's row hashes (trained before retrain kept them): count the growth, and
        # a rewrite that did not grow counts as all new
        return (grown if grown > 0 else int(len(hashes))), " (counted from row counts: v%s has no row hashes)" % champ_v

    def _last_rejected_on(self, fp: str, champ_v) -> dict | None:
        try:
            events = self.reg.events(self.name)
        except Exception:
            return None
        for e in reversed(events):
            if e.get("event") == "retrain_promoted":
                return None
            if (e.get("event") in ("retrain_rejected", "retrain_deploy_failed") and e.get("fingerprint") == fp
                    and e.get("champion") == champ_v and not e.get("stale_champion")):
                why = "rejected" if e["event"] == "retrain_rejected" else "not deployed (its deploy failed)"
                return {**e, "why": why}
        return None

    def _holdout(self, X, y, split: dict, champ_rows, hashes):
        """The rows both models are scored on, and a description of them: the test split without any row
        the challenger or the champion trained on (duplicates included), or the spec's data.holdout."""
        spec = self.spec
        Xtr, Xte, _, yte = train_mod.split_with(split, X, y, spec.data["source"])
        trained = hashes[Xtr.index.to_numpy()]
        if champ_rows is not None:
            trained = np.concatenate([trained, champ_rows["train"]])
        if spec.data.get("holdout"):
            hds = data.load(spec.data["holdout"])
            hX, hy = data.split_xy(hds, spec.data["target"], list(X.columns))
            overlap = int(np.isin(model_rows(hX, hy), trained).sum())
            info = {"source": hds.source, "rows": int(len(hX)), "fresh": overlap == 0, "trained_on": overlap}
            if overlap:
                info["note"] = f"{overlap} of its rows are rows a model trained on"
            return hX, hy, info
        keep = ~np.isin(hashes[Xte.index.to_numpy()], trained)
        if int(keep.sum()) >= MIN_FRESH_ROWS:
            info = {"source": "test split, without the rows either model trained on", "rows": int(keep.sum()),
                    "fresh": champ_rows is not None or self.report.get("champion") is None,
                    "dropped": int((~keep).sum())}
            if not info["fresh"]:
                info["note"] = "the champion has no row hashes: some rows may be rows it trained on"
            return Xte[keep], yte[keep], info
        note = f"only {int(keep.sum())} test rows are new to both models: scored on the whole test split"
        return Xte, yte, {"source": "test split", "rows": int(len(Xte)), "fresh": False, "note": note}

    def _challenge(self, ds, X, y, hashes, champ_v, champ, champ_rows, basis) -> dict:
        from mlpipe import evaluate as ev
        name, spec, reg = self.name, self.spec, self.reg
        since = f" since v{champ_v}" if champ_v is not None else ""
        seen = (f"{data.redact_source(spec.data['source'])}, {self.report['new_rows']} new rows{since} "
                f"({len(hashes)} rows, fingerprint {self.report['fingerprint'][:12]})")
        self.log(f"retrain {name}: training a challenger on {seen}")
        with tempfile.TemporaryDirectory(prefix="mlpipe-retrain-") as tmp:
            tmp = Path(tmp)
            manifest = train_mod.train(spec, tmp, dataset=(ds, X, y))
            hX, hy, holdout = self._holdout(X, y, manifest["split"], champ_rows, hashes)
            metric_names = ev._wanted_metrics(spec.metrics, spec.gate)
            require_onnx = ev.require_onnx_from_env()
            ours_model = ev._model_for_scoring(tmp, manifest, require_onnx)
            ours = train_mod.score(ours_model, metric_names, hX, hy)
            theirs, champ_error, trusted = None, None, None
            if champ_v is not None:
                try:
                    theirs, trusted = self._score_champion(champ_v, champ, metric_names, hX, hy, ours_model,
                                                           list(X.columns), require_onnx)
                except MlpipeError as exc:
                    champ_error = str(exc)
                    self.log(f"warning: champion v{champ_v} cannot be scored: {exc}")
            checks = ev.checks_for(ours, spec.gate, theirs)
            if champ_error and spec.gate.get("max_regression"):
                # never promote on an unchecked regression: a corrupt or unreadable champion, a library
                # upgrade or a feature change is a decision for a person
                for c in checks:
                    if c["check"] == "max_regression":
                        c.update(passed=False, note=f"champion v{champ_v} could not be scored: {champ_error}")
            if trusted is not None:
                # the champion's own stored holdout: rows it never trained on and whose labels predate this
                # data, so a batch of bad labels cannot carry the challenger through
                for c in ev.checks_for(trusted["metrics"], {"max_regression": spec.gate.get("max_regression") or {}},
                                       trusted["champion_metrics"]):
                    checks.append({**c, "check": "max_regression_on_champion_holdout",
                                   "data": trusted["source"], "rows": trusted["rows"]})
            if not checks:
                checks.append({"check": "gate", "metric": None, "value": None, "threshold": None, "passed": False,
                               "note": "the spec has no gate: set gate.min and/or gate.max_regression so a "
                                       "challenger can be judged"})
            if spec.model.get("estimator") or spec.model.get("steps"):
                classes = int(y.nunique()) if train_mod.is_classifier(ours_model) or hasattr(ours_model, "classes_") else None
                if classes is not None and classes < 2:
                    checks.append({"check": "classes", "metric": None, "value": classes, "threshold": 2, "passed": False,
                                   "note": f"the data has {classes} class(es) in '{spec.data['target']}'"})
            passed = all(c["passed"] for c in checks)
            scores = self._scores(ours, theirs, champ_v)
            where = f"on the same holdout ({holdout['rows']} rows{'' if holdout['fresh'] else ', ' + (holdout.get('note') or '')})"
            failures = ev.describe_failures({"checks": [c for c in checks if c["check"] in ("min", "max", "max_regression")
                                                        and c.get("value") is not None and
                                                        (c["check"] != "max_regression" or c.get("baseline") is not None)],
                                             "baseline": f"champion v{champ_v}"})
            for c in checks:
                if c["passed"]:
                    continue
                if c["check"] == "max_regression_on_champion_holdout":
                    failures.append(f"{c['metric']} regressed by {c['regression']:.4f} on v{champ_v}'s stored holdout "
                                    f"({c['value']:.4f} vs {c['baseline']:.4f}); allowed {c['threshold']}")
                elif c.get("note") and (c["check"] != "max_regression" or c.get("baseline") is None):
                    failures.append(c["note"])
            verdict = "passed" if passed else "rejected: " + "; ".join(failures)
            message = f"retrain: {seen}; challenger {scores} {where} → {verdict}"
            self.report.update(metrics=ours, champion_metrics=theirs, holdout=holdout, checks=checks,
                               passed=passed, trained=True, champion_error=champ_error, verdict=verdict)
            m = artifact.read_manifest(tmp)
            m["retrain"] = {"champion": champ_v, "alias": self.alias, "new_rows": self.report["new_rows"],
                            "holdout": holdout, "metrics": ours, "champion_metrics": theirs, "checks": checks,
                            "passed": passed, "verdict": verdict}
            (tmp / artifact.MANIFEST).write_text(json.dumps(m, indent=2, default=str))
            if self.dry_run:
                outcome = "promoted" if passed else "rejected"
                return self._finish(outcome, f"retrain {name}: dry run — challenger {scores} {where} → would be "
                                    f"{'promoted to ' + self.alias if passed else verdict}; nothing was registered")
            prepare = None
            if spec.notebook and self.notebook:
                from mlpipe import notebook as nb_mod

                def prepare(n, _spec=spec, _tmp=tmp):
                    self.log(f"retrain {name}: running notebook {Path(_spec.notebook).name} for v{n}")
                    nb_mod.run(_spec, _tmp, n)
            registered = reg.register(tmp, message, **({"prepare": prepare} if prepare else {}))
        n = registered["version"]
        self.report["version"] = n
        keep_rows(reg, registered, ds, X, y, hashes, self.log)
        nb_failed = None
        if registered.get("notebook"):
            from mlpipe import notebook as nb_mod
            self.report["notebook"] = registered["notebook"]
            if nb_mod.record_outcome(reg, registered) == "failed":
                nb_failed = registered["notebook"].get("error") or "failed"
        if not passed:
            return self._finish("rejected", f"retrain {name}: challenger v{n} {scores} {where} → {verdict}; "
                                f"v{n} stays registered, unpromoted", "retrain_rejected")
        # promote, unless somebody moved the alias while we trained
        now_v, _ = self._champion()
        if now_v != champ_v:
            return self._finish("rejected", f"retrain {name}: challenger v{n} passed, but {name}@{self.alias} moved "
                                f"from v{champ_v} to v{now_v} during the run; not promoted (run again to compare "
                                f"with v{now_v})", "retrain_rejected", stale_champion=True)
        promoted = f"retrain {name}: challenger v{n} {scores} {where} → promoted to {self.alias}"
        if nb_failed:
            promoted += f" (notebook failed: {nb_failed})"
        if not spec.retrain.get("deploy"):
            reg.promote(f"{name}:{n}", self.alias, reason=message)
            return self._finish("notebook_failed" if nb_failed else "promoted", promoted, "retrain_promoted")
        # from the promotion to the end of the deploy a signal is held until it can be acted on: the alias
        # never stays on a version that is not deployed
        stop: list[int] = []
        handlers = _defer_signals(stop)
        try:
            try:
                reg.promote(f"{name}:{n}", self.alias, reason=message)
            except Exception:
                self._put_alias_back(n, champ_v, f"retrain: promoting v{n} failed half-way")
                raise
            self.log(f"{promoted}; deploying v{n} with playbooks/deploy.yml")
            return self._deploy(n, champ_v, promoted, nb_failed, stop)
        finally:
            _restore_signals(handlers)

    def _score_champion(self, champ_v, champ, metric_names, hX, hy, ours_model, features, require_onnx):
        """The champion's scores on the fresh holdout, and both models' scores on the champion's stored
        holdout (None when it has none or the challenger cannot read it)."""
        from mlpipe import evaluate as ev
        with tempfile.TemporaryDirectory(prefix="mlpipe-champion-") as tmp:
            path, manifest, _ = self.reg.pull(f"{self.name}:{champ_v}", tmp)
            model = ev._model_for_scoring(path, manifest, require_onnx)
            inputs = [i["name"] for i in manifest["signature"]["inputs"]]
            missing = [c for c in inputs if c not in hX.columns]
            if missing:
                raise DataError(f"the data no longer has the champion's feature(s) {', '.join(missing[:5])}",
                                hint="a feature change needs a person: compare with mlpipe evaluate and promote by hand")
            fresh = train_mod.score(model, metric_names, hX[inputs], hy)
            stored = ev.stored_holdout(path, manifest)
            trusted = None
            if stored is not None and self.spec.gate.get("max_regression"):
                frame = stored.frame
                target = manifest["signature"]["target"]["name"]
                if all(c in frame.columns for c in features) and target in frame.columns:
                    names = list(self.spec.gate["max_regression"])
                    trusted = {"source": stored.source, "rows": int(len(frame)),
                               "champion_metrics": train_mod.score(model, names, frame[inputs], frame[target]),
                               "metrics": train_mod.score(ours_model, names, frame[features], frame[target])}
        return fresh, trusted

    def _scores(self, ours: dict, theirs: dict | None, champ_v) -> str:
        first = next(iter(self.spec.gate.get("max_regression") or self.spec.gate.get("min") or {}), None) \
            or (self.spec.metrics[0] if self.spec.metrics else next(iter(ours), None))
        if first is None:
            return "(no metrics)"
        text = f"{first}={ours[first]:.3f}"
        if theirs is not None and first in theirs:
            text += f" vs champion v{champ_v} {theirs[first]:.3f}"
        elif champ_v is None:
            text += " (no champion yet)"
        return text

    def _deploy(self, n: int, champ_v, promoted: str, nb_failed, stop: list) -> dict:
        from mlpipe import fleet
        name, reg = self.name, self.reg
        # a SIGTERM/SIGINT during the deploy stops ansible-playbook through ansible-runner (not this
        # process alone, which would leave the playbook running on without us)
        if stop:
            result = {"status": "canceled", "rc": None, "error": "interrupted before the deploy started",
                      "failed_hosts": [], "hosts": []}
        else:
            try:
                result = deploy(name, n, self.project, self.inventory, self.log, cancelled=lambda: bool(stop))
            except MlpipeError as exc:
                result = {"status": "error", "rc": None, "error": str(exc), "failed_hosts": [], "hosts": []}
        if stop or result.get("status") == "canceled":
            back = self._put_alias_back(n, champ_v, f"retrain: the deploy of v{n} was interrupted")
            self.report["deploy"] = result
            self._finish("deploy_failed", f"retrain {name}: the deploy of v{n} was interrupted (signal "
                         f"{stop[0] if stop else '?'}); {back}; finish or undo the fleet with playbooks/deploy.yml "
                         f"or rollback.yml -e break_lock=true", "retrain_deploy_failed")
            raise KeyboardInterrupt("deploy interrupted")
        try:
            state = fleet.fleet_state(reg, name)
            live = state.get("live")
            hosts = sorted(h for h, e in state["hosts"].items() if e.get("version") == n and e.get("event") == "deployed")
        except Exception as exc:
            live, hosts = None, []
            result.setdefault("error", f"cannot read the fleet state: {exc}")
        result["live"], result["deployed_hosts"] = live, hosts
        self.report["deploy"] = result
        if result.get("rc") == 0 and live == n:
            line = f"{promoted}, deployed to {len(hosts)} host{'s' if len(hosts) != 1 else ''}"
            return self._finish("notebook_failed" if nb_failed else "promoted", line, "retrain_promoted")
        back = self._put_alias_back(n, champ_v, f"retrain: the deploy of v{n} failed")
        what = result.get("error") or f"ansible-playbook {result.get('status')} (rc {result.get('rc')})"
        if result.get("failed_hosts"):
            what += f", failed on {', '.join(result['failed_hosts'])}"
        line = (f"retrain {name}: challenger v{n} passed but its deploy failed ({what}); the fleet stays on "
                f"v{live if live is not None else '?'}; {back}")
        return self._finish("deploy_failed", line, "retrain_deploy_failed")

    def _put_alias_back(self, n: int, champ_v, reason: str) -> str:
        name, reg, alias = self.name, self.reg, self.alias
        try:
            a = reg.alias(name, alias)
            if a is None or int(a["version"]) != n:
                return f"{alias} was moved by someone else meanwhile (v{a['version'] if a else '-'}); left as it is"
            if champ_v is None:
                reg.store.delete(f"{name}/aliases/{alias}.json")
                reg.record(name, "rolled_back", version=None, alias=alias, previous=n, reason=reason)
                return f"{alias} removed again (it had no earlier version)"
            reg.rollback(name, alias, reason=reason)
            return f"{alias} is back on v{champ_v}"
        except Exception as exc:
            return f"could not put {alias} back on v{champ_v}: {exc} (run mlpipe models rollback {name} --alias {alias})"


def retrain(spec: Spec, reg, **kwargs) -> dict:
    return Run(spec, reg, **kwargs).run()


def failed(reg, name: str, exc: BaseException, log: Callable[[str], None] = print) -> None:
    """Record an error outcome (best effort: the registry may be what failed)."""
    root = getattr(reg.store, "root", None)
    if root is not None and not Path(root).is_dir():
        return  # writing the event would create the missing registry
    try:
        reg.record(name, "retrain_failed", reason=f"{type(exc).__name__}: {exc}")
    except Exception as rec_exc:
        log(f"warning: could not write the retrain_failed ledger event: {rec_exc}")


__all__ = ["retrain", "Run", "pause", "resume", "paused", "acquire", "release", "cooldown", "deploy", "failed", "Locked", "NotFound"]
