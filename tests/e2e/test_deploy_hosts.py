"""Deploys against hosts in trouble, under a steady load through HAProxy, over SSH: a host whose
sshd dies mid-deploy (the only host of the last batch), an unreachable host at preflight, a model
the fleet does not serve, bearer tokens on, and a failed first deploy to a new host. The tests run
in order on one fleet of their own."""
import json
import os
import shutil

import pytest

from conftest import EXAMPLES
from e2e.fleet import setup_v1, ADDRESSES, ALL, Load, holdout, on, serial, train

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token"
AUTH = ["-e", json.dumps({"model_server_auth_tokens": [TOKEN]})]


def test_setup_v1(fleet):
    setup_v1(fleet)


def test_host_unreachable_in_the_last_batch(fleet):
    """ms3's sshd dies after the canary switched: Ansible cannot reach the only host of the last
    batch, and the switched hosts are still rolled back."""
    assert train(fleet, "v2") == 2
    try:
        with Load(fleet.lb_url, fleet.body) as load:
            proc = fleet.start_playbook("deploy.yml", "-e", "model=credit-risk", "-e", "version=2", *serial(1, 1, 1), *holdout(fleet))
            fleet.wait_for(lambda: fleet.deployed_on("ms1", 2))
            fleet.stop_sshd(ADDRESSES[3])
            out = fleet.finish(proc)
        assert proc.returncode != 0
        assert not load.failures, load.counts
        assert fleet.versions() == on(fleet, 1), out[-3000:]  # ms3's server never switched and kept serving
        summary = out[out.rfind("FAILED."):]
        assert "ms3 is unreachable" in summary, summary[:2000]
        assert "ms1: rolled back: serves v1 again" in summary and "ms2: rolled back: serves v1 again" in summary
    finally:
        fleet.start_sshd(ADDRESSES[3])


def test_unreachable_host_refused_at_preflight(fleet):
    fleet.stop_sshd(ADDRESSES[2])
    try:
        r = fleet.deploy(2, *holdout(fleet))
    finally:
        fleet.start_sshd(ADDRESSES[2])
    assert r.returncode != 0
    assert "refused before any host switched" in r.stdout and "ms2 is unreachable" in r.stdout
    assert "--limit '!ms2'" in r.stdout
    assert fleet.versions() == on(fleet, 1)
    assert fleet.fleet_state()["lock"] is None


def test_model_the_fleet_does_not_serve_is_refused(fleet):
    r = fleet.mlpipe("train", str(EXAMPLES / "house-prices.yml"), "-m", "other")
    assert r.returncode == 0, r.stderr
    r = fleet.deploy(1, *holdout(fleet), model="house-prices")
    assert r.returncode != 0
    assert "ms1 does not serve this model: house-prices is not in its model_server_models (credit-risk)" in r.stdout, r.stdout[-2000:]
    assert "run playbooks/site.yml first" in r.stdout
    assert fleet.versions() == on(fleet, 1)


def test_auth_tokens(fleet):
    """Tokens turned on by site.yml (a rolling restart), then a deploy and a failed deploy that
    both check the servers with the token."""
    fleet.headers = {"Authorization": f"Bearer {TOKEN}"}
    with Load(fleet.lb_url, fleet.body, headers=fleet.headers) as load:
        site = fleet.playbook("site.yml", *AUTH)
        ok = fleet.deploy(2, *holdout(fleet), *AUTH)
        bad = fleet.deploy(1, *holdout(fleet, bad_on="ms2"), *serial(1, 1, 1), *AUTH)
    assert site.returncode == 0, site.stdout[-3000:]
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert bad.returncode != 0
    assert not load.failures, load.counts
    assert "401" not in bad.stdout[bad.stdout.rfind("FAILED."):]
    assert "ms1: rolled back: serves v2 again, in the balancer" in bad.stdout
    import requests
    assert requests.get(f"{fleet.host_url('ms1')}/metadata", timeout=5).status_code == 401  # no token


def test_failed_first_deploy_to_a_new_host(fleet):
    """ms3 is new (no version at all). Its check fails: it has nothing to go back to, so its
    versions are removed and it is left out of the balancer, said so in the summary."""
    import requests
    headers = fleet.headers
    ms3 = fleet.root / "ms3" / "models" / "credit-risk"
    owner = ms3.stat()
    shutil.rmtree(ms3)
    ms3.mkdir()
    os.chown(ms3, owner.st_uid, owner.st_gid)  # the server's user writes .last-good there
    assert fleet.supervisorctl("ms3", "restart", "mlpipe-credit-risk").returncode == 0
    fleet.wait_for(lambda: requests.get(f"{fleet.host_url('ms3')}/v2/health/ready", timeout=5).status_code == 503, timeout=60)
    fleet.wait_for(lambda: "ms3" not in fleet.lb_up(), timeout=30)
    assert train(fleet, "v3") == 3
    with Load(fleet.lb_url, fleet.body, headers=headers) as load:
        r = fleet.deploy(3, *holdout(fleet, bad_on="ms3"), *serial(1, 1, 1), *AUTH)
    assert r.returncode != 0
    assert not load.failures, load.counts
    summary = r.stdout[r.stdout.rfind("FAILED."):]
    assert "ms3: OUT OF THE BALANCER: it had no earlier version to go back to" in summary, summary[:2000]
    v = fleet.versions()
    assert v["ms1"] == 2 and v["ms2"] == 2
    assert not (ms3 / "current").exists() and not (ms3 / ".last-good").exists()
    assert sorted(fleet.lb_up()) == ["ms1", "ms2"]
    # a good version later brings it in
    r = fleet.deploy(3, *holdout(fleet), *AUTH)
    assert r.returncode == 0, r.stdout[-3000:]
    assert sorted(fleet.lb_up()) == ALL

