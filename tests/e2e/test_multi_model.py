"""Several models on one fleet, end to end on the local fleet (sshd per host, supervisord, gunicorn,
HAProxy), under a steady load through HAProxy:

a. site.yml with model_server_models [credit-risk, hello-world]; each model trained and deployed on its
   own (deploy.yml -e model=NAME); HAProxy routes /models/<name>/... and /v2/models/<name>/... to the
   servers of that model; plain /invocations says to name one.
b. credit-risk deployed (v2) and rolled back while hello-world takes traffic: hello-world never fails,
   credit-risk never fails either, and no server restarts (the workers follow each model's link).
c. house-prices added to the list: site.yml changes no server (no restart, same worker processes),
   HAProxy gets the model's backend; its first deploy makes it answer; the others never fail.

The tests run in order on one fleet of their own (see conftest.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from conftest import EXAMPLES
from e2e.fleet import ALL, Load, holdout, recap_changed, train

pytestmark = pytest.mark.e2e

TWO = ["-e", json.dumps({"model_server_models": ["credit-risk", "hello-world"]})]
THREE = ["-e", json.dumps({"model_server_models": ["credit-risk", "hello-world", "house-prices"]})]


def iris_body() -> dict:
    from sklearn.datasets import load_iris
    frame = load_iris(as_frame=True).frame
    cols = [c for c in frame.columns if c != "target"]
    return {"dataframe_split": {"columns": cols, "data": frame[cols].head(2).values.tolist()}}


def served(fleet, model: str) -> dict:
    """Each server's version of ``model`` (None when it does not answer for it)."""
    out = {}
    for h in ALL:
        try:
            r = requests.get(f"{fleet.host_url(h)}/models/{model}/metadata", timeout=5)
            out[h] = r.json()["version"] if r.status_code == 200 else None
        except requests.RequestException:
            out[h] = None
    return out


def processes(fleet) -> dict:
    """Each server's gunicorn master and worker pids."""
    out = {}
    for h in ALL:
        master = int((fleet.root / h / "run" / "gunicorn.pid").read_text().split()[0])
        workers = {int(p) for f in Path(f"/proc/{master}/task").glob("*/children") for p in f.read_text().split()}
        out[h] = (master, frozenset(workers))
    return out


STATE: dict = {}


def test_a_two_models_each_deployed_on_its_own(fleet):
    r = fleet.playbook("site.yml", *TWO)
    assert r.returncode == 0, r.stdout[-3000:]
    assert train(fleet, "credit-risk v1") == 1
    r = fleet.mlpipe("train", str(EXAMPLES / "hello-world.yml"), "-m", "hello-world v1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 1, r.stderr
    # the list is the fleet's configuration (group_vars); given with -e here, so to every playbook.
    # Without it, a deploy of hello-world is refused, naming each host and what it serves
    r = fleet.deploy(1, model="hello-world")
    assert r.returncode != 0 and "ms1 does not serve this model: hello-world is not in its model_server_models" in r.stdout
    r = fleet.deploy(1, *holdout(fleet), *TWO)
    assert r.returncode == 0, r.stdout[-3000:]
    r = fleet.deploy(1, *TWO, model="hello-world")
    assert r.returncode == 0, r.stdout[-3000:]
    assert served(fleet, "credit-risk") == {h: 1 for h in ALL}
    assert served(fleet, "hello-world") == {h: 1 for h in ALL}
    # through HAProxy, by name, in both protocols; unnamed routes say what to send
    r = requests.post(f"{fleet.lb_url}/models/hello-world/invocations", json=iris_body(), timeout=10)
    assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
    r = requests.post(f"{fleet.lb_url}/models/credit-risk/invocations", json=fleet.body, timeout=10)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
    meta = requests.get(f"{fleet.lb_url}/v2/models/hello-world", timeout=10).json()
    inputs = [{"name": i["name"], "datatype": "FP64", "shape": [1], "data": [1.0]} for i in meta["inputs"]]
    r = requests.post(f"{fleet.lb_url}/v2/models/hello-world/infer", json={"inputs": inputs}, timeout=10)
    assert r.status_code == 200 and r.json()["model_name"] == "hello-world", r.text
    r = requests.post(f"{fleet.lb_url}/invocations", json=fleet.body, timeout=10)
    assert r.status_code == 400 and "serves 2 models (credit-risk, hello-world)" in r.json()["error"], r.text
    # the ledger is per model
    assert fleet.fleet_state("hello-world")["live"] == 1 and fleet.fleet_state("credit-risk")["live"] == 1
    STATE["procs"] = processes(fleet)


def test_b_one_model_deployed_and_rolled_back_while_the_other_answers(fleet):
    assert train(fleet, "credit-risk v2") == 2
    with Load(f"{fleet.lb_url}/models/hello-world", iris_body()) as other, \
            Load(f"{fleet.lb_url}/models/credit-risk", fleet.body, threads=1) as same:
        deploy = fleet.deploy(2, *holdout(fleet), *TWO)
        assert deploy.returncode == 0, deploy.stdout[-3000:]
        assert served(fleet, "credit-risk") == {h: 2 for h in ALL}
        back = fleet.playbook("rollback.yml", "-e", "model=credit-risk", "-e", 'reason="e2e: back to v1"', *TWO)
        assert back.returncode == 0, back.stdout[-3000:]
    print("hello-world during credit-risk's deploy and rollback:", dict(other.counts), "credit-risk:", dict(same.counts))
    assert not other.failures and sum(other.counts.values()) > 30, other.counts
    assert set(other.counts) == {"1"}  # hello-world stayed on its version
    assert not same.failures and {"1", "2"} <= set(same.counts), same.counts
    assert served(fleet, "credit-risk") == {h: 1 for h in ALL}
    assert served(fleet, "hello-world") == {h: 1 for h in ALL}
    assert processes(fleet) == STATE["procs"]  # no server and no worker restarted


def test_c_a_model_added_to_the_list_is_served_without_a_restart(fleet):
    r = fleet.mlpipe("train", str(EXAMPLES / "house-prices.yml"), "-m", "house-prices v1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 1, r.stderr
    with Load(f"{fleet.lb_url}/models/hello-world", iris_body()) as other, \
            Load(f"{fleet.lb_url}/models/credit-risk", fleet.body, threads=1) as same:
        site = fleet.playbook("site.yml", *THREE)
        assert site.returncode == 0, site.stdout[-3000:]
        assert processes(fleet) == STATE["procs"]  # nothing restarted
        deploy = fleet.deploy(1, *THREE, model="house-prices")
        assert deploy.returncode == 0, deploy.stdout[-3000:]
    assert not other.failures and not same.failures, (other.counts, same.counts)
    assert served(fleet, "house-prices") == {h: 1 for h in ALL}
    meta = requests.get(f"{fleet.lb_url}/v2/models/house-prices", timeout=10).json()
    row = {i["name"]: 1.0 for i in meta["inputs"]}
    r = requests.post(f"{fleet.lb_url}/models/house-prices/invocations", json={"dataframe_records": [row]}, timeout=10)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text
    assert processes(fleet) == STATE["procs"]
    # a second site.yml run changes nothing
    again = fleet.playbook("site.yml", *THREE)
    assert again.returncode == 0 and recap_changed(again.stdout) == 0, again.stdout[-2000:]
