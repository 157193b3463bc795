"""site.yml on a running fleet (Ansible over SSH, HAProxy, supervisord + gunicorn per host) under a
bounded request loop through HAProxy: a configuration change restarts the servers one host at a
time, each drained first, with no failed request; a stopped server is started again; a second run
changes nothing; the only server up is restarted without being drained; the servers run as the
unprivileged user mlpipe. The tests run in order on one fleet: each starts from the state the
previous one left."""
import csv
import re
import socket
import subprocess

import pytest

from conftest import EXAMPLES
from e2e.conftest import HOLDOUT
from e2e.fleet import Load

pytestmark = pytest.mark.e2e

SERVERS = ("ms1", "ms2", "ms3")
PROGRAM = "mlpipe-credit-risk"
WORKERS = ("-e", "model_server_workers=3")
TOKEN = "s3cret"


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: {host: {"ok": n, "changed": n, ...}}."""
    out = {}
    for line in stdout.split("PLAY RECAP")[-1].splitlines():
        m = re.match(r"^(\S+)\s*:\s*(.*)$", line.strip())
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def task_hosts(stdout: str, *names: str) -> list[tuple[str, str]]:
    """(task name, host) in the order Ansible ran them, for the tasks named (ok or changed only)."""
    out, task = [], None
    for line in stdout.splitlines():
        m = re.match(r"^(?:TASK|RUNNING HANDLER) \[(?:[\w.]+ : )?(.*?)\] \*", line)
        if m:
            task = m.group(1)
            continue
        m = re.match(r"^(ok|changed): \[([^\]\s]+)", line)
        if m and task in names:
            out.append((task, m.group(2)))
    return out


def gunicorn(fleet, host: str) -> dict:
    """The server's master (from run/gunicorn.pid) and its workers: pids and users."""
    pid = int((fleet.root / host / "run" / "gunicorn.pid").read_text().split()[0])
    master = subprocess.run(["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True).stdout.split()
    workers = subprocess.run(["ps", "-o", "pid=,user=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return {"pid": pid, "user": master[0] if master else None,
            "workers": dict(zip(workers[0::2], workers[1::2]))}


def lb_status(fleet) -> dict[str, str]:
    """HAProxy's status of every model server (show stat on lb1's admin socket)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(fleet.root / "lb1" / "run" / "haproxy.sock"))
    s.sendall(b"show stat\n")
    data = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    return {r["svname"]: r["status"] for r in csv.DictReader(data.lstrip("# ").splitlines())
            if r["pxname"] == "mlpipe" and r["svname"] in SERVERS}


def site(fleet, *extra: str):
    r = fleet.playbook("site.yml", *extra)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return r


def test_a_first_site_run_then_v1(fleet):
    r = site(fleet)  # the very first run: no balancer yet, nothing to drain
    assert task_hosts(r.stdout, "Drain this host in the load balancer") == []
    assert fleet.mlpipe("train", str(EXAMPLES / "credit-risk.yml"), "-m", "v1").returncode == 0
    assert fleet.mlpipe("models", "promote", "credit-risk:1", "--alias", "production").returncode == 0
    d = fleet.playbook("deploy.yml", "-e", "model=credit-risk", "-e", "version=@production",
                       "-e", f"model_deploy_holdout=csv:{fleet.root / HOLDOUT}")
    if d.returncode != 0:  # deploy.yml is not what this module tests: put v1 on the hosts without it
        print(f"deploy.yml failed (rc {d.returncode}); pulling v1 onto the hosts directly:\n{d.stdout[-2000:]}")
        for h in SERVERS:
            p = fleet.mlpipe("models", "pull", "credit-risk:1", "--dest", str(fleet.root / h / "models" / "credit-risk"),
                             "--activate")
            assert p.returncode == 0, p.stderr
            assert fleet.supervisorctl(h, "restart", PROGRAM).returncode == 0
    fleet.wait_for(lambda: fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}, timeout=60)
    import requests
    fleet.wait_for(lambda: requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, timeout=10).status_code == 200,
                   timeout=30)
    for h in SERVERS:
        g = gunicorn(fleet, h)
        assert g["user"] == "mlpipe" and set(g["workers"].values()) == {"mlpipe"} and len(g["workers"]) == 2, (h, g)
        model_dir = fleet.root / h / "models" / "credit-risk"
        assert model_dir.owner() == "mlpipe" and (model_dir / "1").owner() == "root"
        assert (fleet.root / h / "etc" / "serve.yml").stat().st_mode & 0o777 == 0o640
        assert (fleet.root / h / "run").owner() == "root"  # supervisord's pidfile and socket: not the server's


def test_b_config_change_restarts_one_host_at_a_time_without_a_failed_request(fleet):
    before = {h: gunicorn(fleet, h)["pid"] for h in SERVERS}
    with Load(fleet.lb_url, fleet.body) as load:
        r = site(fleet, *WORKERS)
    print("config change, requests through HAProxy:", dict(load.counts))
    assert not load.failures, load.counts
    assert sum(load.counts.values()) > 50, load.counts
    # every server restarted, with the new setting, still as mlpipe
    for h in SERVERS:
        g = gunicorn(fleet, h)
        assert g["pid"] != before[h] and g["user"] == "mlpipe" and len(g["workers"]) == 3, (h, g)
    # one host at a time: drained, restarted, back in the balancer, then the next
    steps = task_hosts(r.stdout, "Drain this host in the load balancer", "Put this host back in the load balancer")
    assert [(t.split()[0], h) for t, h in steps] == [(s, h) for h in SERVERS for s in ("Drain", "Put")], steps
    assert recap(r.stdout)["ms1"]["changed"] > 0


def test_c_stopped_server_is_started_again(fleet):
    """ms3's program stopped (supervisord up), and ms2's supervisord shut down altogether."""
    stopped = fleet.supervisorctl("ms3", "stop", PROGRAM)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert fleet.supervisorctl("ms2", "shutdown").returncode == 0
    fleet.wait_for(lambda: fleet.versions() == {"ms1": 1, "ms2": None, "ms3": None}, timeout=60)
    # the load starts once HAProxy has seen them go (before, a request may be retried on both dead ones)
    fleet.wait_for(lambda: lb_status(fleet) == {"ms1": "UP", "ms2": "DOWN", "ms3": "DOWN"}, timeout=30)
    ms1 = gunicorn(fleet, "ms1")["pid"]
    with Load(fleet.lb_url, fleet.body) as load:
        r = site(fleet, *WORKERS)
    print("heal, requests through HAProxy:", dict(load.counts))
    assert not load.failures, load.counts
    assert fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}
    assert lb_status(fleet) == {"ms1": "UP", "ms2": "UP", "ms3": "UP"}  # each waited for until HAProxy had it up
    for h in ("ms2", "ms3"):
        assert "RUNNING" in fleet.supervisorctl(h, "status", PROGRAM).stdout
        g = gunicorn(fleet, h)
        assert g["user"] == "mlpipe" and len(g["workers"]) == 3, (h, g)
    assert gunicorn(fleet, "ms1")["pid"] == ms1  # only the stopped ones were touched
    changed = recap(r.stdout)
    assert changed["ms2"]["changed"] > 0 and changed["ms3"]["changed"] > 0 and changed["ms1"]["changed"] == 0, changed
    # started with the configuration as it is: not restarted on top of that
    assert task_hosts(r.stdout, "Drain this host in the load balancer", "Put this host back in the load balancer") == []


def test_d_second_run_changes_nothing(fleet):
    with Load(fleet.lb_url, fleet.body) as load:
        r = site(fleet, *WORKERS)
    print("second run, requests through HAProxy:", dict(load.counts))
    assert not load.failures, load.counts
    assert all(c["changed"] == 0 for c in recap(r.stdout).values()), recap(r.stdout)


def test_e_auth_tokens_rolled_out_without_a_failed_request(fleet):
    import requests
    before = {h: gunicorn(fleet, h)["pid"] for h in SERVERS}
    auth = {"Authorization": f"Bearer {TOKEN}"}  # servers without auth ignore it
    with Load(fleet.lb_url, fleet.body, headers=auth) as load:
        r = site(fleet, *WORKERS, "-e", '{"model_server_auth_tokens": ["%s"]}' % TOKEN)
    print("auth tokens, requests through HAProxy:", dict(load.counts))
    assert not load.failures, load.counts
    assert TOKEN not in r.stdout  # serve.yml is written with no_log
    assert all(gunicorn(fleet, h)["pid"] != before[h] for h in SERVERS)
    assert requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, timeout=10).status_code == 401
    assert requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, headers=auth, timeout=10).status_code == 200
    fleet.headers = auth
    assert fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}


def test_f_the_only_server_up_is_not_drained(fleet):
    """ms2 and ms3 stopped, then a config change: ms1 (first, the only server up) is restarted while
    serving rather than drained (a drained last server would take every request down with it)."""
    for h in ("ms2", "ms3"):
        assert fleet.supervisorctl(h, "stop", PROGRAM).returncode == 0
    fleet.wait_for(lambda: lb_status(fleet) == {"ms1": "UP", "ms2": "DOWN", "ms3": "DOWN"}, timeout=30)
    r = site(fleet, "-e", '{"model_server_auth_tokens": ["%s"]}' % TOKEN)  # workers back to 2
    assert task_hosts(r.stdout, "Drain this host in the load balancer") == []
    assert "ms1 restarted while serving: it was the only server up" in r.stdout
    assert fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}
    assert {h: len(gunicorn(fleet, h)["workers"]) for h in SERVERS} == {"ms1": 2, "ms2": 2, "ms3": 2}
    assert lb_status(fleet) == {"ms1": "UP", "ms2": "UP", "ms3": "UP"}
