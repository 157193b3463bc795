"""site.yml on a running fleet (Ansible over SSH, HAProxy, supervisord + gunicorn per host) under a
bounded request loop through HAProxy: a configuration change restarts the servers one host at a
time, each drained first, with no failed request; a stopped server is started again; a second run
changes nothing; the servers run as the unprivileged user mlpipe. The tests run in order on one
fleet: each starts from the state the previous one left."""
import re
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
    stopped = fleet.supervisorctl("ms3", "stop", PROGRAM)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert fleet.versions()["ms3"] is None
    others = {h: gunicorn(fleet, h)["pid"] for h in ("ms1", "ms2")}
    with Load(fleet.lb_url, fleet.body) as load:
        r = site(fleet, *WORKERS)
    assert not load.failures, load.counts
    assert fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}
    assert "RUNNING" in fleet.supervisorctl("ms3", "status", PROGRAM).stdout
    assert gunicorn(fleet, "ms3")["user"] == "mlpipe"
    assert {h: gunicorn(fleet, h)["pid"] for h in ("ms1", "ms2")} == others  # only ms3 was touched
    changed = recap(r.stdout)
    assert changed["ms3"]["changed"] > 0 and changed["ms1"]["changed"] == changed["ms2"]["changed"] == 0, changed


def test_d_second_run_changes_nothing(fleet):
    with Load(fleet.lb_url, fleet.body) as load:
        r = site(fleet, *WORKERS)
    assert not load.failures, load.counts
    assert all(c["changed"] == 0 for c in recap(r.stdout).values()), recap(r.stdout)


def test_e_auth_tokens_rolled_out_without_a_failed_request(fleet):
    import requests
    before = {h: gunicorn(fleet, h)["pid"] for h in SERVERS}
    auth = {"Authorization": f"Bearer {TOKEN}"}  # servers without auth ignore it
    with Load(fleet.lb_url, fleet.body, headers=auth) as load:
        r = site(fleet, *WORKERS, "-e", '{"model_server_auth_tokens": ["%s"]}' % TOKEN)
    assert not load.failures, load.counts
    assert TOKEN not in r.stdout  # serve.yml is written with no_log
    assert all(gunicorn(fleet, h)["pid"] != before[h] for h in SERVERS)
    assert requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, timeout=10).status_code == 401
    assert requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, headers=auth, timeout=10).status_code == 200
    fleet.headers = auth
    assert fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}
