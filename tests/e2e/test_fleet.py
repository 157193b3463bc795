"""End to end on the local fleet: Ansible over real SSH (sshd on 127.0.0.10-13), HAProxy,
supervisord + gunicorn per host, with bounded request loops through HAProxy. The tests run in
order on one fleet: each starts from the state the previous one left."""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import EXAMPLES
from e2e.conftest import HOLDOUT
from e2e.fleet import Load, recap_changed

pytestmark = pytest.mark.e2e


def deploy(fleet, version, *extra):
    return fleet.playbook("deploy.yml", "-e", "model=credit-risk", "-e", f"version={version}",
                          "-e", f"model_deploy_holdout=csv:{fleet.root / HOLDOUT}", *extra)


def test_a_site_and_deploy_v1(fleet):
    r = fleet.playbook("site.yml")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "ansible_connection" not in r.stdout
    # the playbooks really reach the hosts over SSH (sshd on their loopback addresses)
    ssh = subprocess.run([str(shutil.which("ansible", path=fleet.env["PATH"])), "ms2", "-m", "ansible.builtin.command",
                          "-a", "printenv SSH_CONNECTION"], cwd=str(EXAMPLES.parent), env=fleet.env, capture_output=True,
                         text=True, timeout=120)
    assert ssh.returncode == 0 and f"127.0.0.12 {fleet.ssh_port}" in ssh.stdout, ssh.stdout + ssh.stderr
    assert fleet.mlpipe("train", str(EXAMPLES / "credit-risk.yml"), "-m", "v1").returncode == 0
    assert fleet.mlpipe("models", "promote", "credit-risk:1", "--alias", "production").returncode == 0
    r = deploy(fleet, "@production")
    assert r.returncode == 0, r.stdout[-3000:]
    assert fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}
    # the servers answer through HAProxy, reached over SSH-configured hosts
    import requests
    assert requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, timeout=10).json()["model_version"] == "1"
    # a second run changes nothing
    again = deploy(fleet, "@production")
    assert again.returncode == 0 and recap_changed(again.stdout) == 0, again.stdout[-2000:]
    site_again = fleet.playbook("site.yml")
    assert site_again.returncode == 0 and recap_changed(site_again.stdout) == 0, site_again.stdout[-2000:]


def test_b_deploy_v2_under_load(fleet):
    assert fleet.mlpipe("train", str(EXAMPLES / "credit-risk.yml"), "-m", "v2").returncode == 0
    with Load(fleet.lb_url, fleet.body) as load:
        r = deploy(fleet, "2")
    assert r.returncode == 0, r.stdout[-3000:]
    assert not load.failures, load.counts
    assert load.counts["2"] > 0 and sum(load.counts.values()) > 100
    assert fleet.versions() == {"ms1": 2, "ms2": 2, "ms3": 2}
    deployed = [(e["host"], e["version"]) for e in fleet.events("credit-risk") if e["event"] == "deployed"]
    assert {("ms1", 2), ("ms2", 2), ("ms3", 2)} <= set(deployed)
    assert fleet.mlpipe("models", "promote", "credit-risk:2", "--alias", "production").returncode == 0


def test_c_bad_v3_fails_canary_and_is_rolled_back(fleet):
    r = fleet.mlpipe("train", str(EXAMPLES / "credit-risk.yml"), "--data", f"csv:{fleet.root / 'shuffled.csv'}", "-m", "bad")
    assert r.returncode == 0 and json.loads(fleet.mlpipe("models", "show", "credit-risk:3", "--json").stdout)["version"] == 3
    with Load(fleet.lb_url, fleet.body) as load:
        r = deploy(fleet, "3")
    assert r.returncode != 0
    summary = r.stdout[r.stdout.rfind("FAILED."):][:1500]
    assert "host ms1: check 'Check health, version, latency and the gate's metrics" in summary
    assert "accuracy" in summary and "needs >= 0.85" in summary
    assert fleet.versions() == {"ms1": 2, "ms2": 2, "ms3": 2}
    assert json.loads(fleet.mlpipe("models", "show", "credit-risk@production", "--json").stdout)["version"] == 2
    assert not load.failures, load.counts
    assert load.counts.get("3", 0) == 0, load.counts  # the drained canary never took balanced traffic
    events = fleet.events("credit-risk")
    assert any(e["event"] == "deploy_failed" and e["version"] == 3 and "accuracy" in e["reason"] for e in events)
    assert any(e["event"] == "host_rolled_back" and e["host"] == "ms1" and e["version"] == 2 for e in events)
    assert not any(e["event"] == "deployed" and e["version"] == 3 for e in events)


def test_d_tampered_artifact_refused_before_any_switch(fleet):
    assert fleet.mlpipe("train", str(EXAMPLES / "credit-risk.yml"), "-m", "v4").returncode == 0
    onnx = fleet.registry / "credit-risk" / "versions" / "4" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[200] ^= 0xFF
    onnx.write_bytes(bytes(data))
    r = deploy(fleet, "4")
    assert r.returncode != 0
    assert "does not match its manifest" in r.stdout + r.stderr
    assert fleet.versions() == {"ms1": 2, "ms2": 2, "ms3": 2}
    for h in ("ms1", "ms2", "ms3"):
        assert not (fleet.root / h / "models" / "credit-risk" / "4").exists()


def test_f_rollback_under_load(fleet):
    with Load(fleet.lb_url, fleet.body) as load:
        r = fleet.playbook("rollback.yml", "-e", "model=credit-risk")
    assert r.returncode == 0, r.stdout[-3000:]
    assert not load.failures, load.counts
    assert fleet.versions() == {"ms1": 1, "ms2": 1, "ms3": 1}
    assert any(e["event"] == "fleet_rolled_back" for e in fleet.events("credit-risk"))


def test_e_host_dies_mid_deploy(fleet):
    """ms2's server (supervisord and gunicorn) is killed once the canary has switched."""
    assert fleet.mlpipe("train", str(EXAMPLES / "credit-risk.yml"), "-m", "v5").returncode == 0
    proc = subprocess.Popen([str(shutil.which("ansible-playbook", path=fleet.env["PATH"])), "playbooks/deploy.yml",
                             "-e", "model=credit-risk", "-e", "version=5", "-e", f"model_deploy_holdout=csv:{fleet.root / HOLDOUT}"],
                            cwd=str(EXAMPLES.parent), env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(e["event"] == "deployed" and e["version"] == 5 for e in fleet.events("credit-risk")):
            break
        time.sleep(0.2)
    conf = fleet.root / "ms2" / "etc" / "supervisord.conf"
    sup_pid = int((fleet.root / "ms2" / "run" / "supervisord.pid").read_text())
    gun_pid = int(next((fleet.root / "ms2" / "run").glob("**/gunicorn.pid")).read_text())
    os.kill(sup_pid, 9)
    os.kill(gun_pid, 9)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-3000:]
    v = fleet.versions()
    assert v["ms2"] is None  # dead
    assert v["ms1"] == 1 and v["ms3"] == 1, (v, out[-3000:])  # every live host back on the old version
    summary = out[out.rfind("FAILED."):]
    assert "supervisord is not running on ms2" in summary, summary[:2000]
    assert "ms1: rolled back: serves v1 again, in the balancer" in summary
    # the dead host leaves the balancer; traffic keeps flowing to the others
    import requests
    time.sleep(2)
    answers = {requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, timeout=10).json()["model_version"] for _ in range(10)}
    assert answers == {"1"}
    assert conf.exists()
