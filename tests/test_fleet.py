"""mlpipe.fleet: the deploy lock (file and S3 registries), the fleet's rollback target from the
ledger, a host's switch record and activation without the registry, HAProxy's view (a real
haproxy child process)."""
import json
import subprocess
import threading

import pytest

from mlpipe import fleet, hostdir
from mlpipe.errors import Locked, NotFound, UsageError
from mlpipe.registry import Registry
from conftest import free_port, haproxy_backend, run_cli, stop, wait_port


@pytest.fixture(params=["file", "s3"])
def reg(request, tmp_path, built):
    if request.param == "file":
        r = Registry(str(tmp_path / "reg"))
    else:
        r = Registry(f"s3://{request.getfixturevalue('s3_bucket')}/models")
    for _ in range(3):
        r.register(built)
    return r


@pytest.mark.integration
def test_lock_refuses_a_second_run_naming_the_holder(reg):
    first = fleet.acquire(reg, "hello-world", "deploy", "run-a", target=2)
    assert first["taken"] and first["run"] == "run-a"
    with pytest.raises(Locked) as exc:
        fleet.acquire(reg, "hello-world", "rollback", "run-b")
    msg = str(exc.value)
    assert "locked by" in msg and "deploy of v2, run run-a" in msg and "since" in msg and "break_lock=true" in msg
    assert exc.value.exit_code == 8
    assert fleet.acquire(reg, "hello-world", "deploy", "run-a")["taken"] is False  # the holder re-enters
    assert fleet.release(reg, "hello-world", "run-b") is False  # only the holder releases
    assert fleet.release(reg, "hello-world", "run-a") is True
    assert fleet.read_lock(reg, "hello-world") is None
    fleet.acquire(reg, "hello-world", "rollback", "run-b")


@pytest.mark.integration
def test_break_lock_takes_over_and_is_recorded(reg):
    fleet.acquire(reg, "hello-world", "deploy", "dead-run", target=3)
    taken = fleet.acquire(reg, "hello-world", "deploy", "new-run", target=3, break_lock=True)
    assert taken["taken"] and taken["broken"]["run"] == "dead-run"
    assert fleet.read_lock(reg, "hello-world")["run"] == "new-run"
    assert any(e["event"] == "lock_broken" and e["run"] == "new-run" for e in reg.events("hello-world"))


@pytest.mark.integration
def test_two_runs_racing_for_the_lock_one_wins(reg):
    results, barrier = [], threading.Barrier(6)

    def race(i):
        barrier.wait()
        try:
            fleet.acquire(reg, "hello-world", "deploy", f"run-{i}")
            results.append(i)
        except Locked:
            pass
    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and fleet.read_lock(reg, "hello-world")["run"] == f"run-{results[0]}"


def test_lock_of_an_unknown_or_hostile_model(tmp_path, built):
    reg = Registry(str(tmp_path / "reg"))
    reg.register(built)
    with pytest.raises(NotFound):
        fleet.acquire(reg, "nope", "deploy", "r")
    with pytest.raises(UsageError):
        fleet.acquire(reg, "../hello-world", "deploy", "r")


def test_rollback_target_is_one_version_and_stable(tmp_path, built):
    reg = Registry(str(tmp_path / "reg"))
    for _ in range(3):
        reg.register(built)
    with pytest.raises(NotFound, match="no completed fleet deploy"):
        fleet.rollback_target(reg, "hello-world")
    fleet.record_fleet(reg, "hello-world", "fleet_deployed", 1)
    with pytest.raises(NotFound, match="first version deployed"):
        fleet.rollback_target(reg, "hello-world")
    fleet.record_fleet(reg, "hello-world", "fleet_deployed", 2)
    assert fleet.record_fleet(reg, "hello-world", "fleet_deployed", 2) is None  # already says so
    # failed deploys of v3 (host events only) do not change what the fleet goes back to
    reg.record("hello-world", "deployed", version=3, host="ms1")
    reg.record("hello-world", "host_rolled_back", version=2, host="ms1")
    reg.record("hello-world", "deploy_failed", version=3)
    t = fleet.rollback_target(reg, "hello-world")
    assert t["target"] == 1 and t["live"] == 2 and t["hosts"]["ms1"] == {"event": "host_rolled_back", "version": 2,
                                                                          "at": t["hosts"]["ms1"]["at"]}
    fleet.record_fleet(reg, "hello-world", "fleet_rolled_back", 1)
    again = fleet.rollback_target(reg, "hello-world")
    assert again["target"] == 1 and "changes nothing" in again["why"]
    assert fleet.record_fleet(reg, "hello-world", "fleet_rolled_back", 1) is None
    # deploying the version the fleet was rolled back to changes nothing, nor the next target
    assert fleet.record_fleet(reg, "hello-world", "fleet_deployed", 1) is None
    assert fleet.rollback_target(reg, "hello-world")["target"] == 1
    assert fleet.rollback_target(reg, "hello-world", version=3)["target"] == 3
    with pytest.raises(NotFound):
        fleet.rollback_target(reg, "hello-world", version=9)
    fleet.record_fleet(reg, "hello-world", "fleet_deployed", 3)
    assert fleet.fleet_state(reg, "hello-world")["previous"] == 1  # what was live before v3


def test_activate_uses_the_hosts_own_copy_without_the_registry(tmp_path, built):
    reg = Registry(str(tmp_path / "reg"))
    for _ in range(2):
        reg.register(built)
    d = tmp_path / "host"
    fleet.activate(d, "hello-world", 1, registry=reg)
    out = fleet.activate(d, "hello-world", 2, registry=reg, deploy_run="r1")
    assert out["pulled"] and out["switched"] and hostdir.current(d) == 2
    pending = json.loads((d / fleet.PENDING).read_text())
    assert pending["target"] == 2 and pending["before"] == 1
    # an interrupted switch of v2 followed by a deploy of v1: "before" stays the last good one
    st = fleet.host_status(d, "hello-world")
    assert st["before"] == 1 and st["current"] == 2 and st["pending"]["run"] == "r1"

    class Gone:
        def pull(self, *a, **k):
            raise AssertionError("the registry was called")
    back = fleet.activate(d, "hello-world", 1, registry=Gone(), set_previous=None)
    assert back["pulled"] is False and hostdir.current(d) == 1
    assert fleet.finish(d) is True and fleet.finish(d) is False
    with pytest.raises(NotFound, match="not on this host"):
        fleet.activate(d, "hello-world", 7)
    # a tampered local copy is not used: it is pulled again
    (d / "2" / "model.joblib").write_bytes(b"tampered")
    again = fleet.activate(d, "hello-world", 2, registry=reg)
    assert again["pulled"] is True


def test_deactivate_leaves_nothing_a_worker_could_load(tmp_path, built):
    reg = Registry(str(tmp_path / "reg"))
    reg.register(built)
    d = tmp_path / "host"
    fleet.activate(d, "hello-world", 1, registry=reg)
    (d / ".last-good").write_text("1")
    out = fleet.deactivate(d)
    assert set(out["removed"]) == {"current", ".last-good"}
    assert hostdir.current(d) is None and not (d / ".last-good").exists()


@pytest.fixture
def haproxy(tmp_path):
    up_port = free_port()
    listener = subprocess.Popen(["python3", "-m", "http.server", str(up_port), "--bind", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    wait_port("127.0.0.1", up_port, listener)
    try:
        with haproxy_backend(tmp_path, [f"a 127.0.0.1:{up_port}", f"b 127.0.0.1:{free_port()}"]) as sock:
            yield sock
    finally:
        stop(listener)


@pytest.mark.integration
def test_lb_status_never_lets_the_last_server_up_drain(haproxy):
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = fleet.lb_status(haproxy, "mlpipe")
        if st["up"] == ["a"] and not st["servers"]["b"]["up"]:
            break
        time.sleep(0.1)
    assert st["up"] == ["a"] and st["servers"]["a"]["scur"] == 0  # requests in flight
    assert fleet.may_drain(st, "b") is True and fleet.may_drain(st, "a") is False
    r = run_cli("fleet", "lb-status", "--socket", haproxy, "--backend", "mlpipe", "--server", "a")
    assert r.returncode == 0 and json.loads(r.stdout)["may_drain"] is False
    with pytest.raises(NotFound, match="no backend 'other'"):
        fleet.lb_status(haproxy, "other")


def test_lb_status_names_a_missing_socket(tmp_path):
    r = run_cli("fleet", "lb-status", "--socket", tmp_path / "nope.sock", "--backend", "mlpipe")
    assert r.returncode == 2 and "does not exist" in r.stderr and "site.yml" in r.stderr
    # site.yml's first run: no balancer yet is not an error there
    r = run_cli("fleet", "lb-status", "--socket", tmp_path / "nope.sock", "--backend", "mlpipe", "--missing-ok")
    assert r.returncode == 0 and json.loads(r.stdout) is None


def test_service_state_of_a_supervisord_that_is_not_running(tmp_path):
    svc = fleet.Service("mlpipe-x", "supervisord", str(tmp_path / "missing.conf"))
    assert svc.state() == "NO_SUPERVISOR"
    assert "supervisord is not running on ms9" in svc.describe("NO_SUPERVISOR", "ms9")
    with pytest.raises(UsageError):
        fleet.Service("x", "upstart")
