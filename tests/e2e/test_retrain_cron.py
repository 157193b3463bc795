"""Cron retraining end to end on the local fleet, with the real cron daemon (``cron -f``, a child
process of this test) and a steady request loop through HAProxy:

a. site.yml, v1 trained and deployed; ``playbooks/retrain.yml`` installs the entry (a one-minute
   schedule here) for the mlpipe user; ``crontab -l`` shows it.
b. labelled rows are appended to the data source: the entry fires, v2 is trained, passes, is promoted
   and is live on every host, with no failed request; the cron line that fired is the one crontab shows.
c. no new data: the next firing skips.
d. rows with flipped labels: the challenger is rejected, nothing is deployed.
e. two copies of the cron line at once: one runs, one exits at the lock.
f. the model removed from retrain_cron_models loses its entry.

The tests run in order on one fleet (its own sshd and server ports, see conftest.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from e2e.fleet import ALL, ROOT, Load, on

pytestmark = pytest.mark.e2e

MODEL = "credit-risk"  # the model the fleet's servers serve (site.yml)
DEV_LOG = "/dev/log"
CRON_USER = "mlpipe"


# ------------------------------------------------------------------------------------ fixtures
class Syslog:
    """A datagram socket cron logs to: ``(mlpipe) CMD (<command>)`` per job it starts.

    cron logs through syslog(3), i.e. to /dev/log. A socket left there by an interrupted run (nobody
    answers: ECONNREFUSED) is removed and taken. When a live syslog daemon owns /dev/log, ours is bound
    elsewhere and cron alone sees it at /dev/log through a private mount namespace (``crond`` below).
    """

    def __init__(self, tmp: Path):
        self.private = False
        if os.path.lexists(DEV_LOG):
            if stat.S_ISSOCK(os.lstat(DEV_LOG).st_mode) and not _live_socket(DEV_LOG):
                os.unlink(DEV_LOG)  # stale: left by a run that was killed before its teardown
            else:
                self.private = True  # a live daemon's socket, or a link to one (journald): not ours to take
        self.path = str(tmp / "cron-syslog.sock") if self.private else DEV_LOG
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.lines.append(data.decode(errors="replace"))

    def commands(self, user: str = CRON_USER) -> list[str]:
        out = []
        for line in list(self.lines):
            m = re.search(rf"\({re.escape(user)}\) CMD \((?:\[\d+\] )?(.*)\)\s*$", line)  # -L 8 adds [pid]
            if m:
                out.append(m.group(1))
        return out

    def close(self):
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _live_socket(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(path)
        return True
    except OSError:  # ECONNREFUSED: a socket file nobody listens on; ENOTSOCK etc.: not a socket at all
        return False
    finally:
        s.close()


@pytest.fixture(scope="module")
def syslog(fleet):
    s = Syslog(fleet.tmp)
    yield s
    s.close()


@pytest.fixture(scope="module")
def crond(syslog, fleet):
    """The real cron daemon, in the foreground as a child of this test (-L 15: log starts, ends, failures)."""
    cron = shutil.which("cron", path="/usr/sbin:/usr/bin:/sbin")
    if not cron:
        pytest.fail("cron is not installed: run 'make test' (it installs the Debian packages the suite needs)")
    argv = [cron, "-f", "-L", "15"]
    if syslog.private:
        # a syslog daemon owns /dev/log: cron gets ours there in a mount namespace of its own
        unshare = shutil.which("unshare")
        if not unshare:
            pytest.fail(f"a syslog daemon owns {DEV_LOG} and unshare(1) is missing: this test reads cron's CMD lines")
        argv = [unshare, "--mount", "--propagation", "private", "--", "sh", "-c",
                f'mount --bind "$0" {DEV_LOG} && exec "$@"', syslog.path, *argv]
    log = open(fleet.tmp / "cron.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    time.sleep(1)
    if proc.poll() is not None:
        log.close()
        pytest.fail(f"cron -f exited at once ({proc.returncode}): is another cron daemon running? "
                    f"{(fleet.tmp / 'cron.log').read_text()[-500:]}")
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["crontab", "-r", "-u", CRON_USER], capture_output=True)  # nothing may fire after the test
        # kept with the other logs of the fleet (conftest copies <tmp>/*.log)
        (fleet.tmp / "syslog.log").write_text("\n".join(syslog.lines))
        for f in fleet.root.glob("trainer1/log/retrain/*.log"):
            shutil.copy(f, fleet.tmp / f"trainer1-retrain-{f.name}")


# ------------------------------------------------------------------------------------- helpers
def data_frame() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer
    return load_breast_cancer(as_frame=True).frame.sample(frac=1.0, random_state=11).reset_index(drop=True)


def write_atomically(path: Path, frame: pd.DataFrame) -> None:
    """Cron may fire at any moment: a reader sees the old file or the new one, never half of it."""
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def crontab() -> str:
    r = subprocess.run(["crontab", "-l", "-u", CRON_USER], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def entry(tab: str, name: str = MODEL) -> str:
    """The job line under the ``#Ansible: mlpipe retrain NAME`` marker."""
    lines = tab.splitlines()
    i = lines.index(f"#Ansible: mlpipe retrain {name}")
    return lines[i + 1]


def env_lines(tab: str) -> dict:
    """NAME=value lines, the way cron reads them (matching quotes around the value are dropped)."""
    out = {}
    for line in tab.splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)\s*=\s*(.*?)\s*$", line)
        if m:
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[m.group(1)] = value
    return out


def retrain_events(fleet) -> list[dict]:
    return [e for e in fleet.events(MODEL) if e["event"].startswith("retrain_")]


def wait_event(fleet, kind: str, after: int, timeout: float = 240) -> dict:
    """The first ledger event ``kind`` after the first ``after`` retrain events (cron fires each minute)."""
    def found():
        ev = retrain_events(fleet)[after:]
        return next((e for e in ev if e["event"] == kind), None)
    return fleet.wait_for(found, timeout=timeout, every=2)


def give_registry_to_cron_user(fleet) -> None:
    # the jobs run as the mlpipe user and write to the registry (versions, ledger, locks); this test
    # wrote its first version as root
    subprocess.run(["chown", "-R", f"{CRON_USER}:{CRON_USER}", str(fleet.registry)], check=True)


STATE: dict = {}


# --------------------------------------------------------------------------------------- tests
def test_a_install_the_entry(fleet, crond, tmp_path_factory):
    import yaml
    frame = data_frame()
    data_dir = fleet.root / "data"
    data_dir.mkdir(exist_ok=True)
    os.chmod(data_dir, 0o755)
    csv = data_dir / "credit.csv"
    write_atomically(csv, frame.iloc[:300])
    spec = {"name": MODEL, "description": "credit-risk retrained by cron from a growing CSV",
            "data": {"source": f"csv:{csv}", "target": "target"},
            "split": {"test_size": 0.25, "random_state": 7, "stratify": True},
            "model": {"estimator": "sklearn.ensemble.RandomForestClassifier",
                      "params": {"n_estimators": 30, "max_depth": 6, "random_state": 0, "n_jobs": 1}},
            "metrics": ["accuracy", "f1_macro"],
            "gate": {"min": {"accuracy": 0.85}, "max_regression": {"accuracy": 0.05}},
            "retrain": {"schedule": "H 3 * * *", "min_new_rows": 100, "cooldown": "0s", "promote": "production",
                        "deploy": True}}
    spec_path = fleet.root / "credit-risk.yml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    STATE.update(frame=frame, csv=csv, spec=spec_path)

    assert fleet.playbook("site.yml").returncode == 0
    # v1 by hand, as root; deploy: true -> deployed through ansible-runner, as the cron job will do later
    r = fleet.mlpipe("retrain", str(spec_path), "--force", "--json", "--project", str(ROOT))
    assert r.returncode == 10, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["version"] == 1 and report["deploy"]["rc"] == 0, report
    assert fleet.versions() == on(fleet, 1)
    give_registry_to_cron_user(fleet)

    models = [{"name": MODEL, "spec": str(spec_path), "schedule": "* * * * *"}]
    r = fleet.playbook("retrain.yml", "-e", json.dumps({"retrain_cron_models": models}))
    assert r.returncode == 0, r.stdout[-4000:]
    tab = crontab()
    line = entry(tab)
    assert line.startswith("* * * * * flock -n "), tab
    assert re.search(rf"/bin/mlpipe retrain \S+/{MODEL}\.yml >> \S+/{MODEL}\.log 2>&1$", line), line
    env = env_lines(tab)
    assert env["MLPIPE_REGISTRY"] == str(fleet.registry) and env["MLPIPE_DEPLOY_PROJECT"], env
    assert "PRIVATE KEY" not in tab and "AWS_SECRET" not in tab
    STATE.update(line=line, log=Path(re.search(r">> (\S+) 2>&1$", line).group(1)), env=env)
    # a second run changes nothing
    again = fleet.playbook("retrain.yml", "-e", json.dumps({"retrain_cron_models": models}))
    assert again.returncode == 0 and re.search(r"changed=0\b", again.stdout.split("PLAY RECAP")[-1]), again.stdout[-3000:]


def test_b_new_labelled_rows_are_trained_promoted_and_deployed_by_cron(fleet, crond, syslog):
    frame, csv = STATE["frame"], STATE["csv"]
    seen = len(retrain_events(fleet))
    with Load(fleet.lb_url, fleet.body) as load:
        write_atomically(csv, frame.iloc[:450])  # 150 new labelled rows
        promoted = wait_event(fleet, "retrain_promoted", seen, timeout=300)
        fleet.wait_for(lambda: fleet.versions() == on(fleet, 2), timeout=60)
    assert promoted["version"] == 2 and promoted["champion"] == 1 and promoted["new_rows"] == 150, promoted
    assert promoted["deploy"]["rc"] == 0 and promoted["deploy"]["live"] == 2, promoted["deploy"]
    assert sorted(promoted["deploy"]["deployed_hosts"]) == ALL
    assert "deployed to 3 hosts" in promoted["reason"]
    assert not load.failures, (load.counts, load.failures[:5])
    assert load.counts.get("2", 0) > 0 and sum(load.counts.values()) > 100, load.counts
    assert fleet.fleet_state()["live"] == 2
    log = STATE["log"].read_text()
    assert "retrain credit-risk: training a challenger" in log and "  | PLAY RECAP" in log, log[-3000:]
    # the job that fired is exactly the line crontab -l shows
    cmd = STATE["line"].split(None, 5)[5]
    assert cmd in syslog.commands(), (cmd, syslog.lines[-10:])


def test_c_no_new_data_skips(fleet, crond):
    seen = len(retrain_events(fleet))
    skipped = wait_event(fleet, "retrain_skipped", seen, timeout=150)
    assert "no new data since v2" in skipped["reason"], skipped
    assert fleet.versions() == on(fleet, 2)
    assert STATE["log"].read_text().rstrip().splitlines()[-1].endswith(skipped["reason"])


def test_d_flipped_labels_are_rejected_and_nothing_is_deployed(fleet, crond):
    frame, csv = STATE["frame"], STATE["csv"]
    flipped = frame.iloc[:450].sample(400, random_state=3).copy()
    flipped["target"] = 1 - flipped["target"]
    seen = len(retrain_events(fleet))
    deploys_before = [e for e in fleet.events(MODEL) if e["event"] in ("deployed", "fleet_deployed")]
    with Load(fleet.lb_url, fleet.body) as load:
        write_atomically(csv, pd.concat([frame.iloc[:450], flipped], ignore_index=True))
        rejected = wait_event(fleet, "retrain_rejected", seen, timeout=300)
    assert rejected["version"] == 3 and rejected["champion"] == 2, rejected
    assert "→ rejected: accuracy" in rejected["reason"]
    assert not load.failures
    assert fleet.versions() == on(fleet, 2)
    assert json.loads(fleet.mlpipe("models", "show", f"{MODEL}@production", "--json").stdout)["version"] == 2
    deploys_after = [e for e in fleet.events(MODEL) if e["event"] in ("deployed", "fleet_deployed")]
    assert deploys_after == deploys_before
    # the same data is not retried at the next firing
    again = wait_event(fleet, "retrain_skipped", seen + 1, timeout=150)
    assert "has not changed since challenger v3 was rejected" in again["reason"]


def test_e_two_copies_at_once_one_exits_at_the_lock(fleet, crond):
    cmd = STATE["line"].split(None, 5)[5]
    lock = re.search(r"flock -n (\S+)", cmd).group(1)
    env = [f"{k}={v}" for k, v in STATE["env"].items()]

    def start():
        return subprocess.Popen(["runuser", "-u", CRON_USER, "--", "env", "-i", *env, "/bin/sh", "-c", cmd])

    def lock_held() -> bool:
        """Whether someone holds the flock, read from /proc/locks: probing with `flock -n` would take
        the lock for a moment itself, and a run starting in that moment exits at the lock."""
        try:
            inode = os.stat(lock).st_ino
        except FileNotFoundError:
            return False
        with open("/proc/locks") as f:
            return any(p[1] == "FLOCK" and p[5].rsplit(":", 1)[-1] == str(inode)
                       for p in (line.split() for line in f) if len(p) > 5)

    # cron itself runs the job at every minute's start: begin early in a minute, once its run is over
    fleet.wait_for(lambda: 3 <= time.localtime().tm_sec <= 30 and not lock_held(), timeout=180, every=0.2)
    first = start()
    fleet.wait_for(lambda: lock_held() or first.poll() is not None, timeout=30, every=0.02)
    second = start()
    assert second.wait(60) == 1  # flock -n: the lock is taken, exit at once
    assert first.wait(300) == 0  # the run: skipped (nothing new)
    assert STATE["log"].read_text().rstrip().splitlines()[-1].split("Z ", 1)[-1].startswith("retrain credit-risk: skipped")


def test_f_a_model_removed_from_the_list_loses_its_entry(fleet, crond):
    r = fleet.playbook("retrain.yml", "-e", json.dumps({"retrain_cron_models": []}))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "mlpipe retrain credit-risk" not in crontab()
