"""Deploy failure paths under a steady load through HAProxy, over SSH: a check failing on the last
batch, an interrupted run finished by the next, two runs at once, rollback.yml twice, a server
stopped mid-deploy, the registry gone after a host switched. Every case asserts 0 failed requests,
the version on every host, and what the summary and the ledger say. The tests run in order on one
fleet (its own ports: this module can run beside the others)."""
import os
import shutil
import signal
import time

import pytest

from e2e.fleet import setup_v1, ALL, Load, holdout, on, recap_changed, serial, train

pytestmark = pytest.mark.e2e
def test_setup_v1(fleet):
    setup_v1(fleet)


def test_check_fails_on_the_last_batch(fleet):
    """Every switched host goes back one at a time: the others keep serving (no mass drain)."""
    assert train(fleet, "v2") == 2
    with Load(fleet.lb_url, fleet.body) as load:
        r = fleet.deploy(2, *serial(1, 1, 1), *holdout(fleet, bad_on="ms3"))
    assert r.returncode != 0
    assert not load.failures, load.counts
    assert load.counts["1"] > 0 and load.counts["2"] > 0  # v2 served while ms1/ms2 were switched
    assert fleet.versions() == on(fleet, 1)
    assert sorted(fleet.lb_up()) == ALL
    summary = r.stdout[r.stdout.rfind("FAILED."):]
    assert "host ms3: check 'Check health, version, latency and the gate's metrics" in summary
    assert "accuracy" in summary and "needs >= 0.85" in summary
    for h in ALL:
        assert f"{h}: rolled back: serves v1 again, in the balancer" in summary, summary[:2000]
    rolled = {e["host"] for e in fleet.events("credit-risk") if e["event"] == "host_rolled_back" and e["version"] == 1}
    assert rolled == set(ALL)
    assert fleet.fleet_state()["live"] == 1 and fleet.fleet_state()["lock"] is None


def test_interrupted_deploy_is_finished_by_the_next_run(fleet):
    """Ctrl-C right after ms2's links moved: the next run (refused until the lock is broken)
    finishes the switch from live state instead of trusting the symlink."""
    ms2 = fleet.root / "ms2" / "models" / "credit-risk"
    with Load(fleet.lb_url, fleet.body) as load:
        proc = fleet.start_playbook("deploy.yml", "-e", "model=credit-risk", "-e", "version=2", *holdout(fleet))
        fleet.wait_for(lambda: (ms2 / ".deploy.json").exists() and os.readlink(ms2 / "current") == "2", timeout=300, every=0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out = fleet.finish(proc)
        assert proc.returncode != 0, out[-2000:]
        # the interrupted host is not "done": not recorded as deployed
        assert not fleet.deployed_on("ms2", 2)
        refused = fleet.deploy(2, *holdout(fleet))
        assert refused.returncode != 0
        assert "credit-risk is locked by" in refused.stdout and "break_lock=true" in refused.stdout, refused.stdout[-2000:]
        r = fleet.deploy(2, *holdout(fleet), "-e", "break_lock=true")
    assert r.returncode == 0, r.stdout[-3000:]
    assert not load.failures, load.counts
    assert fleet.versions() == on(fleet, 2)
    assert sorted(fleet.lb_up()) == ALL
    assert all(fleet.deployed_on(h, 2) for h in ALL)
    assert not (ms2 / ".deploy.json").exists()
    assert any(e["event"] == "lock_broken" for e in fleet.events("credit-risk"))
    state = fleet.fleet_state()
    assert state["live"] == 2 and state["previous"] == 1 and state["lock"] is None


def test_one_deploy_or_rollback_at_a_time(fleet):
    assert train(fleet, "v3") == 3
    lock = fleet.registry / "credit-risk" / "deploys" / "LOCK"
    proc = fleet.start_playbook("deploy.yml", "-e", "model=credit-risk", "-e", "version=3", *holdout(fleet))
    fleet.wait_for(lock.exists, every=0.05)
    second = fleet.deploy(3, *holdout(fleet))
    rollback = fleet.playbook("rollback.yml", "-e", "model=credit-risk")
    out = fleet.finish(proc)
    assert proc.returncode == 0, out[-3000:]
    for r in (second, rollback):
        assert r.returncode != 0
        assert "credit-risk is locked by" in r.stdout and "(deploy of v3, run" in r.stdout and "since" in r.stdout
    assert fleet.versions() == on(fleet, 3)
    assert not lock.exists()


def test_rollback_twice(fleet):
    """One target for the whole fleet (the version live before v3), and a second run changes nothing."""
    with Load(fleet.lb_url, fleet.body) as load:
        first = fleet.playbook("rollback.yml", "-e", "model=credit-risk")
        second = fleet.playbook("rollback.yml", "-e", "model=credit-risk")
    assert first.returncode == 0 and second.returncode == 0, first.stdout[-3000:] + second.stdout[-3000:]
    assert not load.failures, load.counts
    assert fleet.versions() == on(fleet, 2)
    assert recap_changed(second.stdout) == 0, second.stdout[-2000:]
    assert [e["version"] for e in fleet.events("credit-risk") if e["event"] == "fleet_rolled_back"] == [2]


def test_server_stopped_mid_deploy(fleet):
    with Load(fleet.lb_url, fleet.body) as load:
        proc = fleet.start_playbook("deploy.yml", "-e", "model=credit-risk", "-e", "version=3", *serial(1, 1, 1), *holdout(fleet))
        fleet.wait_for(lambda: fleet.deployed_on("ms1", 3) and fleet.events("credit-risk")[-1]["event"] == "deployed")
        stopped = time.monotonic()
        assert fleet.supervisorctl("ms3", "stop", "mlpipe-credit-risk").returncode == 0
        out = fleet.finish(proc)
    assert proc.returncode != 0
    # the only requests allowed to fail: those ms3 was answering when it stopped (its listener
    # closes at once, taking the connections the kernel had queued for it): at most one per
    # worker (2), all at the moment it stopped
    assert len(load.failures) <= 2 and all(stopped <= t <= stopped + 3 for t in load.failure_times), \
        (load.counts, [t - stopped for t in load.failure_times])
    v = fleet.versions()
    assert v["ms3"] is None and v["ms1"] == 2 and v["ms2"] == 2, (v, out[-3000:])
    summary = out[out.rfind("FAILED."):]
    assert "the model server mlpipe-credit-risk on ms3 is not running (supervisord says STOPPED)" in summary, summary[:2000]
    assert "non-zero return code" not in summary
    assert "ms1: rolled back: serves v2 again" in summary
    # site.yml heals the stopped server, with no failed request
    with Load(fleet.lb_url, fleet.body) as load:
        r = fleet.playbook("site.yml")
    assert r.returncode == 0, r.stdout[-3000:]
    assert not load.failures, load.counts
    fleet.wait_for(lambda: fleet.versions() == on(fleet, 2), timeout=60)


def test_registry_gone_after_a_host_switched(fleet):
    """Going back needs no registry: each host reactivates its own verified copy. The ledger writes
    and the lock release fail and the summary says so."""
    moved = fleet.registry.with_name("registry.away")
    try:
        with Load(fleet.lb_url, fleet.body) as load:
            proc = fleet.start_playbook("deploy.yml", "-e", "model=credit-risk", "-e", "version=3", *serial(1, 1, 1), *holdout(fleet))
            fleet.wait_for(lambda: fleet.deployed_on("ms1", 3) and fleet.events("credit-risk")[-1]["event"] == "deployed")
            fleet.registry.rename(moved)
            fleet.registry.write_text("not a registry any more")  # every read and write now fails
            out = fleet.finish(proc)
        assert proc.returncode != 0
        assert not load.failures, load.counts
        assert fleet.versions() == on(fleet, 2), out[-3000:]
        assert sorted(fleet.lb_up()) == ALL
        summary = out[out.rfind("FAILED."):]
        assert "host ms2:" in summary and "registry" in summary.lower(), summary[:2000]
        assert "ms1: rolled back: serves v2 again, in the balancer" in summary
        assert "The deploy lock could not be released" in summary
    finally:
        fleet.registry.unlink(missing_ok=True)
        if moved.exists():
            moved.rename(fleet.registry)
    # with the registry back, the left lock is named and can be broken
    assert fleet.fleet_state()["lock"]["op"] == "deploy"
    r = fleet.deploy(3, *holdout(fleet), "-e", "break_lock=true")
    assert r.returncode == 0, r.stdout[-3000:]
    assert fleet.versions() == on(fleet, 3)
    shutil.rmtree(moved, ignore_errors=True)


def test_ledger_writes_failing_never_fail_a_deploy(fleet):
    """Ledger writes are retried outside the critical path: a deploy whose checks pass stays
    deployed when the ledger cannot be written, and the summary says what is missing."""
    events = fleet.registry / "credit-risk" / "events"
    kept = events.with_name("events.kept")
    events.rename(kept)
    events.write_text("the ledger cannot be written")
    try:
        with Load(fleet.lb_url, fleet.body) as load:
            r = fleet.deploy(2, *holdout(fleet))
    finally:
        events.unlink()
        kept.rename(events)
    assert r.returncode == 0, r.stdout[-3000:]
    assert not load.failures, load.counts
    assert fleet.versions() == on(fleet, 2)
    report = r.stdout[r.stdout.rfind("every host serves it"):]
    assert "Ledger writes that failed during the run and again at the end" in report, report[:2000]
    assert "--event deployed --host ms1" in report and "fleet record credit-risk --event fleet_deployed" in report
