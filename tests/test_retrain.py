"""`mlpipe retrain` as cron runs it: whole processes, a real registry on disk, real data files.

The deploy path against the real fleet is in tests/e2e/test_retrain_cron.py; here a deploy only fails
(a missing project, a playbook that fails), to show the alias goes back.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

BIN = Path(sys.executable).parent
MLPIPE = str(BIN / "mlpipe")


def make_data(n: int, seed: int = 0) -> pd.DataFrame:
    from sklearn.datasets import make_classification
    X, y = make_classification(n_samples=n, n_features=8, n_informative=5, random_state=seed, class_sep=1.5)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(8)])
    df["label"] = y
    return df


class Model:
    """A spec over a CSV that grows, and the registry it retrains into."""

    def __init__(self, tmp: Path, retrain: dict | None = None, estimator: dict | None = None, name: str = "churn"):
        self.tmp, self.name = tmp, name
        self.csv = tmp / "data.csv"
        self.pool = make_data(6000)
        self.used = 0
        self.registry = tmp / "registry"
        self.registry.mkdir()  # retrain refuses a missing file registry without --force (an unmounted disk)
        self.spec_path = tmp / "spec.yml"
        self.spec = {"name": name, "data": {"source": f"csv:{self.csv}", "target": "label"},
                     "split": {"test_size": 0.25, "random_state": 3},
                     "model": estimator or {"estimator": "sklearn.tree.DecisionTreeClassifier",
                                            "params": {"max_depth": 5, "random_state": 0}},
                     "metrics": ["accuracy", "f1_macro"],
                     "gate": {"min": {"accuracy": 0.75}, "max_regression": {"accuracy": 0.03}},
                     "retrain": {"min_new_rows": 200, "cooldown": "0s", **(retrain or {})}}
        self.write_spec()

    def write_spec(self):
        self.spec_path.write_text(yaml.safe_dump(self.spec))

    def append(self, n: int, flip: bool = False):
        rows = self.pool.iloc[self.used:self.used + n].copy()
        self.used += n
        if flip:
            rows["label"] = 1 - rows["label"]
        rows.to_csv(self.csv, mode="a", header=not self.csv.exists(), index=False)

    def run(self, *args, env=None, **kw) -> subprocess.CompletedProcess:
        e = {**os.environ, "MLPIPE_REGISTRY": str(self.registry), **(env or {})}
        return subprocess.run([MLPIPE, *args], capture_output=True, text=True, env=e, timeout=300, **kw)

    def retrain(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run("retrain", str(self.spec_path), *args, **kw)

    def registry_(self):
        from mlpipe.registry import Registry
        return Registry(str(self.registry))

    def events(self, kind: str | None = None) -> list[dict]:
        ev = self.registry_().events(self.name)
        return [e for e in ev if kind is None or e["event"] == kind]

    def alias(self) -> int | None:
        a = self.registry_().alias(self.name, "production")
        return None if a is None else int(a["version"])


@pytest.fixture
def model(tmp_path):
    m = Model(tmp_path)
    m.append(1500)
    return m


def test_first_run_promotes_then_skips_until_enough_new_rows(model):
    r = model.retrain()
    assert r.returncode == 10, r.stdout + r.stderr
    assert "challenger v1 accuracy=" in r.stdout and "(no champion yet)" in r.stdout and "→ promoted to production" in r.stdout
    assert model.alias() == 1

    r = model.retrain()
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "retrain churn: skipped — no new data since v1" in lines[0]

    model.append(120)
    r = model.retrain()
    assert r.returncode == 0
    assert r.stdout.strip().splitlines()[-1].endswith("retrain churn: skipped — 120 new rows since v1, needs 200 (min_new_rows)")

    model.append(400)
    r = model.retrain()
    assert r.returncode == 10, r.stdout + r.stderr
    assert "520 new rows since v1" in r.stdout and "vs champion v1" in r.stdout
    assert model.alias() == 2
    m2 = model.registry_().manifest("churn", 2)
    assert m2["message"].startswith(f"retrain: csv:{model.csv}, 520 new rows since v1 (2020 rows")
    assert "→ passed" in m2["message"] and m2["retrain"]["champion"] == 1 and m2["retrain"]["passed"]
    # champion and challenger were scored on the same rows, none of which the champion trained on
    assert m2["retrain"]["holdout"]["fresh"] and m2["retrain"]["holdout"]["rows"] >= 30
    assert set(m2["retrain"]["champion_metrics"]) == {"accuracy", "f1_macro"}
    kinds = [e["event"] for e in model.events() if e["event"].startswith("retrain_")]
    assert kinds == ["retrain_promoted", "retrain_skipped", "retrain_skipped", "retrain_promoted"]
    skipped = model.events("retrain_skipped")[-1]
    assert skipped["version"] == 1 and skipped["new_rows"] == 120


def test_flipped_labels_are_rejected_stay_registered_and_are_not_retried(model):
    assert model.retrain().returncode == 10
    model.append(1200, flip=True)
    r = model.retrain("--json")
    assert r.returncode == 11, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["outcome"] == "rejected" and report["version"] == 2 and not report["passed"]
    assert any(c["check"] == "min" and not c["passed"] for c in report["checks"])
    assert model.alias() == 1  # not promoted
    m2 = model.registry_().manifest("churn", 2)
    assert "→ rejected: accuracy" in m2["message"] and "vs champion v1" in m2["message"]
    ev = model.events("retrain_rejected")[-1]
    assert ev["version"] == 2 and ev["champion"] == 1 and "needs >= 0.75" in ev["reason"]
    # same data again: nothing new since the rejected challenger
    r = model.retrain()
    assert r.returncode == 0 and "has not changed since challenger v2 was rejected" in r.stdout
    # --force tries again (and is rejected again)
    assert model.retrain("--force").returncode == 11
    assert model.registry_().versions("churn") == [1, 2, 3]


def test_cooldown_pause_and_force(model):
    model.spec["retrain"]["cooldown"] = "6h"
    model.write_spec()
    assert model.retrain().returncode == 10
    model.append(600)
    r = model.retrain()
    assert r.returncode == 0
    assert re.search(r"skipped — cooldown — last retrain \d+s ago \(v1, promoted\), needs 6h00m \(cooldown\)", r.stdout), r.stdout
    r = model.run("retrain", str(model.spec_path), "--pause", "--reason", "labels broken, INC-7")
    assert r.returncode == 0 and "paused" in r.stdout
    r = model.retrain()
    assert r.returncode == 0 and "skipped — paused by" in r.stdout and "labels broken, INC-7" in r.stdout
    r = model.retrain("--force")  # a person retraining now overrides cooldown and pause
    assert r.returncode == 10, r.stdout + r.stderr
    assert model.run("retrain", str(model.spec_path), "--resume").returncode == 0
    kinds = [e["event"] for e in model.events()]
    assert "retrain_paused" in kinds and "retrain_resumed" in kinds


def test_dry_run_changes_nothing(model):
    assert model.retrain().returncode == 10
    model.append(500)
    before = sorted(p.relative_to(model.registry) for p in model.registry.rglob("*"))
    r = model.retrain("--dry-run")
    assert r.returncode == 10 and "dry run" in r.stdout and "nothing was registered" in r.stdout
    assert sorted(p.relative_to(model.registry) for p in model.registry.rglob("*")) == before


def test_two_runs_at_once_one_exits_at_the_lock(tmp_path):
    m = Model(tmp_path, estimator={"estimator": "sklearn.ensemble.RandomForestClassifier",
                                   "params": {"n_estimators": 400, "random_state": 0, "n_jobs": 1}})
    m.append(3000)
    e = {**os.environ, "MLPIPE_REGISTRY": str(m.registry)}
    first = subprocess.Popen([MLPIPE, "retrain", str(m.spec_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=e)
    lock = m.registry / "churn" / "retrain" / "LOCK"
    deadline = time.time() + 60
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()[0]
    # the first run is held (SIGSTOP) while the second starts: on a loaded machine a new interpreter's
    # start-up can outlast the whole first run, and the second would find no lock and nothing new
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = m.retrain()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert second.returncode == 8, second.stdout + second.stderr
    assert "retrain of churn is running on this host (pid" in second.stderr
    assert first.returncode == 10, out
    assert not lock.exists()
    assert m.registry_().versions("churn") == [1]
    assert [e["event"] for e in m.events() if e["event"].startswith("retrain_")] in (
        ["retrain_locked", "retrain_promoted"], ["retrain_promoted", "retrain_locked"])


def test_a_lock_left_by_a_dead_process_is_taken_over(model):
    import socket
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = model.registry / "churn" / "retrain" / "LOCK"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"run": "old", "by": "cron", "host": socket.gethostname(), "pid": dead.pid,
                                "since": "2026-01-01T00:00:00Z"}))
    r = model.retrain()
    assert r.returncode == 10, r.stdout + r.stderr
    broken = model.events("lock_broken")
    assert broken and "its process is gone" in broken[0]["reason"]
    # a live holder on another host is respected until --break-lock
    lock.write_text(json.dumps({"run": "other", "by": "cron", "host": "trainer-9", "pid": 1, "since": "2026-01-01T00:00:00Z"}))
    model.append(300)
    r = model.retrain()
    assert r.returncode == 8 and "trainer-9" in r.stderr and "--break-lock" in r.stderr
    assert model.retrain("--break-lock").returncode == 10


def test_a_failed_deploy_puts_the_alias_back(model, tmp_path):
    model.spec["retrain"]["deploy"] = True
    model.write_spec()
    # no deploy project configured: the first version is promoted, its deploy fails, the alias is removed again
    r = model.retrain(env={"MLPIPE_DEPLOY_PROJECT": ""})
    assert r.returncode == 12, r.stdout + r.stderr
    assert "deploy failed" in r.stdout and "no deploy project is set" in r.stdout
    assert model.alias() is None
    # with a champion: a deploy playbook that fails -> the alias goes back to the champion
    model.spec["retrain"]["deploy"] = False
    model.write_spec()
    assert model.retrain("--force").returncode == 10
    assert model.alias() == 2
    project = tmp_path / "project"
    (project / "playbooks").mkdir(parents=True)
    (project / "inventory").write_text("localhost ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
    (project / "playbooks" / "deploy.yml").write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [{"name": "The canary fails its check", "ansible.builtin.fail": {"msg": "canary of {{ model }} v{{ version }} failed"}}]}]))
    model.spec["retrain"]["deploy"] = True
    model.write_spec()
    model.append(400)
    r = model.retrain(env={"MLPIPE_DEPLOY_PROJECT": str(project), "MLPIPE_DEPLOY_INVENTORY": str(project / "inventory")})
    assert r.returncode == 12, r.stdout + r.stderr
    assert "canary of churn v3 failed" in r.stdout  # ansible-runner's events are streamed to the log
    assert "production is back on v2" in r.stdout
    assert model.alias() == 2
    ev = model.events("retrain_deploy_failed")[-1]
    assert ev["version"] == 3 and ev["deploy"]["rc"] != 0
    assert model.registry_().versions("churn") == [1, 2, 3]
    # the next run does not retrain the same data again (a version a night otherwise)
    r = model.retrain(env={"MLPIPE_DEPLOY_PROJECT": str(project), "MLPIPE_DEPLOY_INVENTORY": str(project / "inventory")})
    assert r.returncode == 0 and "since challenger v3 was not deployed (its deploy failed)" in r.stdout, r.stdout


def test_errors_are_outcomes_too(model, tmp_path):
    r = model.retrain(env={"MLPIPE_REGISTRY": str(tmp_path / "not-mounted")})
    assert r.returncode == 7 and "does not exist (a disk not mounted" in r.stderr, r.stderr
    assert not (tmp_path / "not-mounted").exists()
    model.spec["data"]["source"] = f"csv:{tmp_path / 'missing.csv'}"
    model.write_spec()
    r = model.retrain()
    assert r.returncode == 4 and "missing.csv" in r.stderr
    model.registry.mkdir(exist_ok=True)
    assert model.events("retrain_failed")
    bad = tmp_path / "bad.yml"
    for retrain, complaint in (({"schedule": "H 3 * *"}, "'retrain.schedule': 'H 3 * *' has 4 fields"),
                               ({"cooldown": "soon"}, "'retrain.cooldown' 'soon' is not a duration"),
                               ({"promote": "Prod!"}, "'retrain.promote' 'Prod!' is not a valid alias"),
                               ({"min_new_rows": -1}, "'retrain.min_new_rows' must be 0 or more"),
                               ({"deploy": "yes"}, "'retrain.deploy' must be true/false")):
        bad.write_text(yaml.safe_dump({**model.spec, "retrain": retrain}))
        r = model.run("retrain", str(bad))
        assert r.returncode == 3 and complaint in r.stderr, r.stderr


def test_a_failing_notebook_keeps_the_version_and_says_so(model, tmp_path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("model = ''; version = 0", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise RuntimeError(f'report for {model} v{version} broke')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(tmp_path / "report.ipynb"))
    model.spec["notebook"] = "report.ipynb"
    model.write_spec()
    r = model.retrain()
    assert r.returncode == 13, r.stdout + r.stderr
    assert "→ promoted to production (notebook failed:" in r.stdout
    assert model.alias() == 1  # the gate passed: the version is promoted; only its report failed
    m = model.registry_().manifest("churn", 1)
    assert m["notebook"]["status"] == "failed" and "notebook.ipynb" in m["files"]
    failed = model.events("notebook_failed")
    assert failed and failed[0]["version"] == 1 and "report for churn v1 broke" in failed[0]["reason"]
    assert model.events("retrain_promoted")[0]["notebook"]["status"] == "failed"


def test_a_champion_from_mlpipe_train_is_compared_row_by_row(model):
    assert model.run("train", str(model.spec_path)).returncode == 0
    assert model.run("models", "promote", "churn:1", "--alias", "production").returncode == 0
    assert (model.registry / "churn" / "datasets" / "1.npz").is_file()
    # rewrite the file with the same rows in another order plus 250 new ones: 250 new rows, not 1750
    old = pd.read_csv(model.csv).sample(frac=1.0, random_state=4)
    model.append(250)
    new = pd.read_csv(model.csv).iloc[-250:]
    pd.concat([new, old]).to_csv(model.csv, index=False)
    r = model.retrain("--json")
    assert r.returncode == 10, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["new_rows"] == 250 and report["champion"] == 1
    assert report["holdout"]["fresh"] and "without the rows either model trained on" in report["holdout"]["source"]


def test_never_promoted_on_an_unchecked_or_fooled_gate(tmp_path):
    # a batch of default labels (all 0): on a holdout made mostly of those rows the challenger that
    # learned them wins; the champion's own stored holdout catches it
    m = Model(tmp_path)
    m.append(1500)
    assert m.retrain().returncode == 10
    rows = m.pool.iloc[m.used:m.used + 2000].copy()
    m.used += 2000
    rows["label"] = 0
    rows.to_csv(m.csv, mode="a", header=False, index=False)
    r = m.retrain("--json")
    assert r.returncode == 11, r.stdout + r.stderr
    report = json.loads(r.stdout)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["max_regression_on_champion_holdout"], report["checks"]
    assert "on v1's stored holdout" in report["summary"] and m.alias() == 1

    # a champion whose files are corrupt cannot be compared: rejected, never promoted unchecked
    (m.registry / "churn" / "versions" / "1" / "model.joblib").write_bytes(b"garbage")
    m.append(300)
    r = m.retrain("--force")
    assert r.returncode == 11, r.stdout + r.stderr
    assert "champion v1 could not be scored" in r.stdout and "does not match its manifest" in r.stdout
    assert m.alias() == 1


def test_no_gate_no_promotion(tmp_path):
    m = Model(tmp_path)
    m.spec["gate"] = {}
    m.write_spec()
    m.append(1500)
    r = m.retrain()
    assert r.returncode == 11 and "the spec has no gate" in r.stdout, r.stdout + r.stderr
    assert m.alias() is None


def test_a_reused_pid_and_a_corrupt_row_file_do_not_block_retraining(model):
    import socket
    assert model.retrain().returncode == 10
    (model.registry / "churn" / "datasets" / "1.npz").write_bytes(b"")
    lock = model.registry / "churn" / "retrain" / "LOCK"
    # pid 1 is alive, but it is not the process that took this lock (its start time differs)
    lock.write_text(json.dumps({"run": "old", "by": "cron", "host": socket.gethostname(), "pid": 1,
                                "started": "boot:0", "since": "2026-01-01T00:00:00Z"}))
    model.append(300)
    r = model.retrain()
    assert r.returncode == 10, r.stdout + r.stderr
    assert "(counted from row counts: v1 has no row hashes)" not in r.stdout  # it trained: 300 >= 200
    assert model.events("lock_broken")
