"""What the deploy and rollback playbooks decide from, and the one way a host changes version.

    lock            <registry>/<model>/deploys/LOCK, created with an exclusive write: one deploy or
                    rollback per model at a time; a refusal names the holder and since when
    fleet state     from the ledger: the version live fleet-wide, the one before it (what
                    rollback.yml goes back to) and each host's last deploy event
    host status     from the host itself: its links, the switch it is in the middle of
                    (``<dir>/.deploy.json``), whether its server runs and what version it answers
    activate        put a version on a host: from the host's own verified copy when it has one (no
                    registry call), else pulled; switch the links, reload, wait for the version
    balancer        HAProxy's view of a backend (``show stat`` on the admin socket), so that no step
                    ever drains the last server that is up

Every failure is an MlpipeError whose message says in plain words what is wrong on which host.
"""
from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from mlpipe import artifact, hostdir
from mlpipe.errors import Conflict, IntegrityError, Locked, NotFound, NotReady, UsageError

PENDING = ".deploy.json"
FLEET_EVENTS = ("fleet_deployed", "fleet_rolled_back")
HOST_EVENTS = ("deployed", "host_rolled_back", "host_disabled")


# ------------------------------------------------------------------------------------------ lock
def _lock_key(model: str) -> str:
    from mlpipe.registry import check_name
    return f"{check_name(model)}/deploys/LOCK"


def read_lock(reg, model: str) -> dict | None:
    try:
        return reg.store.get_json(_lock_key(model))
    except KeyError:
        return None


def acquire(reg, model: str, op: str, run: str, target=None, break_lock: bool = False) -> dict:
    """Take the model's deploy lock for ``run``. A lock already held by ``run`` is kept (re-entry)."""
    from mlpipe.registry import whoami
    reg.require_model(model)
    entry = {"op": op, "run": run, "target": target, "by": whoami(), "since": artifact.utcnow(), "pid": os.getpid()}
    body = json.dumps(entry, sort_keys=True).encode()
    try:
        reg.store.put(_lock_key(model), body, exclusive=True)
        return {**entry, "taken": True, "broken": None}
    except Conflict:
        held = read_lock(reg, model) or {}
    if held.get("run") == run:
        return {**held, "taken": False, "broken": None}
    if not break_lock:
        what = f"{held.get('op', '?')}" + (f" of v{held['target']}" if held.get("target") not in (None, "") else "")
        raise Locked(f"{model} is locked by {held.get('by', '?')} ({what}, run {held.get('run', '?')}) "
                     f"since {str(held.get('since', '?'))[:19].replace('T', ' ')} UTC",
                     hint="wait for that run to finish; if it died (interrupted, host lost), run again with "
                          "-e break_lock=true (CLI: --break-lock) to take the lock over and finish its work")
    reg.store.delete(_lock_key(model))
    try:
        reg.store.put(_lock_key(model), body, exclusive=True)
    except Conflict:
        raise Locked(f"{model}: another run took the lock while this one broke the old one",
                     hint="run again once it has finished") from None
    reg.record(model, "lock_broken", version=held.get("target"), reason=f"broke the lock of run {held.get('run')}",
               held_by=held.get("by"), held_since=held.get("since"), run=run)
    return {**entry, "taken": True, "broken": held}


def release(reg, model: str, run: str) -> bool:
    held = read_lock(reg, model)
    if held is None or held.get("run") != run:
        return False
    reg.store.delete(_lock_key(model))
    return True


# ----------------------------------------------------------------------------------- fleet state
def fleet_state(reg, model: str) -> dict:
    """From the ledger: the version live fleet-wide, the one before it, and each host's last event."""
    reg.require_model(model)
    live = previous = last = None
    hosts: dict = {}
    for e in reg.events(model):
        if e.get("event") in FLEET_EVENTS:
            last = e
            if e["event"] == "fleet_deployed":
                if e.get("version") != live:
                    previous, live = e.get("previous", live), e.get("version")
            else:
                live, previous = e.get("version"), None
        elif e.get("event") in HOST_EVENTS and e.get("host"):
            hosts[e["host"]] = {"event": e["event"], "version": e.get("version"), "at": e.get("at")}
    return {"model": model, "live": live, "previous": previous, "last_fleet_event": last, "hosts": hosts,
            "lock": read_lock(reg, model)}


def record_fleet(reg, model: str, event: str, version: int, reason: str = "", **fields) -> dict | None:
    """Record that the whole fleet now serves ``version``; nothing when the ledger already says so."""
    if event not in FLEET_EVENTS:
        raise UsageError(f"{event!r} is not a fleet event", hint=f"use one of {', '.join(FLEET_EVENTS)}")
    state = fleet_state(reg, model)
    if state["live"] == version:  # a re-run, or a deploy of the version a rollback went back to
        return None
    extra = {"previous": state["live"]} if event == "fleet_deployed" else {"from": state["live"]}
    return reg.record(model, event, version=version, reason=reason, **extra, **fields)


def rollback_target(reg, model: str, version: int | None = None) -> dict:
    """The one version every host goes back to: ``version``, else the version live fleet-wide before
    the current one. After a completed rollback it stays the same, so a second run changes nothing."""
    state = fleet_state(reg, model)
    if version is not None:
        reg.manifest(model, version)
        return {**state, "target": int(version), "why": f"pinned with version={version}"}
    last = state["last_fleet_event"]
    if last is None:
        raise NotFound(f"the ledger of {model} records no completed fleet deploy, so there is nothing to roll back to",
                       hint="pass -e version=N to choose the version every host goes to")
    if last["event"] == "fleet_rolled_back":
        return {**state, "target": int(last["version"]),
                "why": f"the fleet was rolled back to v{last['version']} (from v{last.get('from')}); running again changes nothing"}
    if state["previous"] is None:
        raise NotFound(f"v{state['live']} is the first version deployed to the fleet of {model}; there is no earlier one",
                       hint="pass -e version=N to choose the version every host goes to")
    return {**state, "target": int(state["previous"]), "why": f"v{state['previous']} was live fleet-wide before v{state['live']}"}


# ------------------------------------------------------------------------------------------- host
def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UsageError(f"'{cmd[0]}' is not installed on this host") from None
    except subprocess.TimeoutExpired:
        raise NotReady(f"'{' '.join(cmd)}' did not answer within {timeout:.0f} s") from None


class Service:
    """The process supervisor of one model server: supervisord (a config file) or systemd."""

    def __init__(self, name: str, supervisor: str = "systemd", conf: str | None = None):
        if supervisor not in ("systemd", "supervisord"):
            raise UsageError(f"unknown supervisor {supervisor!r}", hint="use systemd or supervisord")
        if supervisor == "supervisord" and not conf:
            raise UsageError("supervisord needs --supervisor-conf PATH")
        self.name, self.supervisor, self.conf = name, supervisor, conf

    def _ctl(self, *args: str) -> subprocess.CompletedProcess:
        return _run(["supervisorctl", "-c", str(self.conf), *args])

    def state(self) -> str:
        """RUNNING, STOPPED, FATAL, ... ; MISSING (no such program); NO_SUPERVISOR (supervisord down)."""
        if self.supervisor == "systemd":
            def prop(name: str) -> str:
                return _run(["systemctl", "show", "-p", name, "--value", self.name]).stdout.strip()
            if prop("LoadState") == "not-found":
                return "MISSING"
            active = prop("ActiveState")
            return {"active": "RUNNING", "reloading": "RUNNING", "activating": "STARTING"}.get(active, (active or "UNKNOWN").upper())
        if not Path(self.conf).is_file():
            return "NO_SUPERVISOR"
        r = self._ctl("status", self.name)
        out = (r.stdout + r.stderr).strip()
        if "no such process" in out.lower() or "no such group" in out.lower():
            return "MISSING"
        if "refused connection" in out.lower() or "no such file" in out.lower() or "unix://" in out:
            return "NO_SUPERVISOR"
        parts = out.split()
        return parts[1] if len(parts) > 1 and parts[0] == self.name else "UNKNOWN"

    def describe(self, state: str, host: str) -> str:
        where = f"{self.name} on {host}"
        return {"MISSING": f"{host} does not serve this model: there is no program {self.name}",
                "NO_SUPERVISOR": f"supervisord is not running on {host} (no answer on the socket of {self.conf})",
                }.get(state, f"the model server {where} is not running ({self.supervisor} says {state})")

    def reload(self) -> None:
        if self.supervisor == "systemd":
            r = _run(["systemctl", "reload", self.name])
        else:
            r = self._ctl("signal", "HUP", self.name)
        if r.returncode != 0 or "ERROR" in r.stdout:
            raise NotReady(f"reloading {self.name} failed: {(r.stdout + r.stderr).strip()[:300]}")


def _get_json(url: str, token: str | None, timeout: float = 3) -> tuple[int | None, dict]:
    import requests
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(url, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        return None, {"error": type(exc).__name__}
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"error": r.text[:200]}


def answers(url: str, token: str | None, model: str | None = None) -> dict:
    """What the server at ``url`` says it serves (of ``model``, on a multi-model host): {status,
    version, ready, load_error}."""
    status, meta = _get_json(f"{url.rstrip('/')}/models/{model}/metadata" if model else f"{url.rstrip('/')}/metadata", token)
    out = {"status": status, "version": None, "load_error": meta.get("load_error"), "error": meta.get("error"),
           "follows": bool(meta.get("follows_current"))}
    if status == 200:
        out["version"] = int(meta["version"]) if str(meta.get("version", "")).isdigit() else None
    elif status == 401:
        out["error"] = "401: the server wants a bearer token and did not accept the one given"
    return out


def _pending(directory: Path) -> dict | None:
    try:
        return json.loads((directory / PENDING).read_text())
    except (OSError, ValueError):
        return None


def host_status(directory: Path, model: str, service: Service | None = None, url: str | None = None,
                token: str | None = None, host: str = "") -> dict:
    """A host's versions and the switch it is in the middle of. ``before``/``before_previous``: what
    to go back to (from an unfinished switch's record when there is one, else the links)."""
    directory = Path(directory)
    cur, prev = hostdir.current(directory), hostdir.previous(directory)
    pending = _pending(directory)
    out = {"host": host, "model": model, "dir": str(directory), "current": cur, "previous": prev, "pending": pending,
           "before": pending["before"] if pending else cur,
           "before_previous": pending["before_previous"] if pending else prev,
           "versions": sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
           if directory.is_dir() else []}
    if service is not None:
        state = service.state()
        out["service"] = {"name": service.name, "state": state, "running": state == "RUNNING",
                          "problem": None if state == "RUNNING" else service.describe(state, host or "this host")}
    if url:
        out["answers"] = answers(url, token, model)
    return out


def _local_copy(directory: Path, model: str, version: int) -> bool:
    path = directory / str(version)
    if not path.is_dir():
        return False
    try:
        m = artifact.verify_dir(path)
    except (IntegrityError, NotFound):
        return False
    return m.get("name") == model and int(m.get("version", -1)) == version


def served_versions(url: str, token: str | None, model: str | None = None) -> set | None:
    """The versions the server's workers serve now (``mlpipe_model_info`` at 1 in ``/metrics``: one
    worker still on the old version keeps it there); None when ``/metrics`` cannot be read."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families
    try:
        r = requests.get(f"{url.rstrip('/')}/metrics", timeout=3,
                         headers={"Authorization": f"Bearer {token}"} if token else {})
        if r.status_code != 200:
            return None
        out = set()
        for family in text_string_to_metric_families(r.text):
            if family.name == "mlpipe_model_info":
                out |= {s.labels.get("version") for s in family.samples
                        if s.value >= 1 and (model is None or s.labels.get("name") == model)}
        return {int(v) for v in out if str(v).isdigit()}
    except (requests.RequestException, ValueError):
        return None


def wait_for_version(url: str, version: int, token: str | None, timeout: float, model: str | None = None) -> dict:
    """Until the server answers with ``version`` and none of its workers serves another one (workers
    follow a switch each on its own, within a fraction of a second of each other)."""
    deadline = time.monotonic() + timeout
    seen: dict = {}
    while True:
        seen = answers(url, token, model)
        if seen["status"] == 200 and seen["version"] == version:
            workers = served_versions(url, token, model)
            if workers is None or workers <= {version}:
                return seen
            seen = {**seen, "version": min(workers - {version}), "others": sorted(workers - {version})}
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if seen["status"] is None:
        what = f"does not answer ({seen.get('error')})"
    elif seen["status"] == 401:
        what = "refuses our bearer token (HTTP 401): set model_deploy_token / the servers' auth tokens to match"
    elif seen["version"] is not None:
        what = f"still serves v{seen['version']}"
    else:
        what = f"answers HTTP {seen['status']} with no model"
    raise NotReady(f"the server at {url} {what} {timeout:.0f} s after the reload, expected v{version}"
                   + (f"; it refused the new version: {seen['load_error']}" if seen.get("load_error") else ""),
                   hint="see the server log on the host")


def activate(directory: Path, model: str, version: int, *, registry=None, keep: int = 3,
             set_previous: int | None = None, service: Service | None = None, url: str | None = None,
             token: str | None = None, timeout: float = 60, deploy_run: str | None = None, host: str = "") -> dict:
    """Put ``version`` on this host: the host's own verified copy when it has one (no registry call),
    else pulled from ``registry``; switch the links atomically, reload, wait until it answers.

    With ``deploy_run``, the switch is recorded in ``<dir>/.deploy.json`` first (what the host served
    before), so an interrupted deploy can be finished or rolled back by the next run."""
    directory = Path(directory)
    version = int(version)
    if service is not None:
        state = service.state()
        if state != "RUNNING" and deploy_run:
            raise NotReady(service.describe(state, host or "this host"),
                           hint="start it with playbooks/site.yml, then deploy again")
    pulled = False
    if not _local_copy(directory, model, version):
        if registry is None:
            raise NotFound(f"v{version} of {model} is not on {host or 'this host'} ({directory}) and no registry was given")
        registry.pull(f"{model}:{version}", directory)
        pulled = True
    cur, prev = hostdir.current(directory), hostdir.previous(directory)
    if deploy_run:
        pending = _pending(directory)
        if not pending or pending.get("target") != version:
            # an older unfinished switch: what the host served before *that* one is still the last
            # version checked good here
            before = pending["before"] if pending else cur
            before_prev = pending["before_previous"] if pending else prev
            record = {"target": version, "before": before, "before_previous": before_prev, "run": deploy_run,
                      "at": artifact.utcnow()}
            tmp = directory / f"{PENDING}.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, directory / PENDING)
    switched = hostdir.activate(directory, version, keep=keep, set_previous=set_previous)
    out = {"host": host, "model": model, "version": version, "before": cur, "previous_before": prev,
           "pulled": pulled, "switched": switched, "changed": pulled or switched}
    if service is not None:
        state = service.state()
        if state != "RUNNING":
            raise NotReady(service.describe(state, host or "this host") + f"; its links now point at v{version}",
                           hint="start it with playbooks/site.yml")
        seen = answers(url, token, model) if url else {}
        if url and not seen.get("follows"):  # no model loaded for it yet (a first deploy): ask the server
            seen["follows"] = bool(_get_json(f"{url.rstrip('/')}/v2", token)[1].get("follows_current"))
        if switched and seen.get("follows"):
            out["reloaded"] = False  # its workers follow the link: no reload, no worker restarted
        elif switched or (url and seen.get("version") != version):
            service.reload()
            out["reloaded"] = True
    if url:
        t0 = time.monotonic()
        wait_for_version(url, version, token, timeout, model)
        out["waited_seconds"] = round(time.monotonic() - t0, 2)
    return out


def deactivate(directory: Path, service: Service | None = None) -> dict:
    """Take every version off this host (a failed first deploy: nothing to go back to). The server
    then answers 503 on readiness, so the balancer keeps it out."""
    directory = Path(directory)
    removed = []
    for name in ("current", "previous", ".last-good"):
        p = directory / name
        if p.is_symlink() or p.exists():
            p.unlink()
            removed.append(name)
    if service is not None and service.state() == "RUNNING":
        service.reload()
    return {"removed": removed, "changed": bool(removed)}


def finish(directory: Path) -> bool:
    """The switch is over (checked and recorded, or rolled back): forget what was served before it."""
    p = Path(directory) / PENDING
    if p.exists():
        p.unlink()
        return True
    return False


# --------------------------------------------------------------------------------------- balancer
def lb_command(sock: str, command: str, timeout: float = 5.0) -> str:
    """One command on HAProxy's admin socket, its whole answer."""
    if not Path(sock).exists():
        raise NotReady(f"the HAProxy admin socket {sock} does not exist", hint="run playbooks/site.yml to start the balancer")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(sock)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
    except OSError as exc:
        raise NotReady(f"cannot talk to HAProxy on {sock}: {exc.strerror or exc}") from None
    return b"".join(chunks).decode()


def lb_status(sock: str, backend: str, timeout: float = 5, missing_ok: bool = False) -> dict | None:
    """HAProxy's view of ``backend``: {server: {status, weight, scur, up}} from ``show stat``
    (``scur``: requests in flight). With ``missing_ok``, None when there is no socket (no balancer yet)."""
    if missing_ok and not Path(sock).exists():
        return None
    text = lb_command(sock, "show stat", timeout).lstrip("# ")
    servers = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
            status = row.get("status", "")
            servers[row["svname"]] = {"status": status, "weight": row.get("weight"), "scur": int(row.get("scur") or 0),
                                      "up": status.startswith("UP") and "DRAIN" not in status}
    if not servers:
        raise NotFound(f"HAProxy on {sock} has no backend '{backend}' with servers",
                       hint="each model has its own backend (<name>_<model>), made by playbooks/site.yml from the "
                            "servers' model_server_models: add the model there and run site.yml; or check model_deploy_lb_backend")
    return {"backend": backend, "servers": servers, "up": sorted(n for n, s in servers.items() if s["up"])}


def may_drain(status: dict, server: str) -> bool:
    """Drain ``server`` only while another server of the backend stays up."""
    return any(n != server for n in status["up"])

